"""`vqtok serve` (argparse only at import time)."""

from __future__ import annotations

import argparse

from clients.cli import CLIError


def _not_yet(args: argparse.Namespace) -> int:
    raise CLIError("'serve' is not implemented yet (issue 5)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve models over HTTP (not yet implemented: issue 5)")
    p.set_defaults(handler=_not_yet)
