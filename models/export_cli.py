"""`vqtok export` (argparse only at import time)."""

from __future__ import annotations

import argparse

from clients.cli import CLIError


def _not_yet(args: argparse.Namespace) -> int:
    raise CLIError("'export' is not implemented yet (issue 4)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model directory to ONNX (not yet implemented: issue 4)")
    p.set_defaults(handler=_not_yet)
