"""`vqtok tokenize` (argparse only at import time)."""

from __future__ import annotations

import argparse

from clients.cli import CLIError


def _not_yet(args: argparse.Namespace) -> int:
    raise CLIError("'tokenize' is not implemented yet (issue 6)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="tokenize an image dataset to parquet (not yet implemented: issue 6)")
    p.set_defaults(handler=_not_yet)
