"""`vqtok train`, `vqtok eval` and `vqtok codebook retrain` (argparse only at import time)."""

from __future__ import annotations

import argparse

from clients.cli import CLIError


def _not_yet(args: argparse.Namespace) -> int:
    raise CLIError(f"'{args.command}' is not implemented yet (issue 3: training package)")


def register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a tokenizer (not yet implemented: issue 3)")
    p.set_defaults(handler=_not_yet)


def register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model directory (not yet implemented: issue 3)")
    p.set_defaults(handler=_not_yet)


def register_codebook(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("codebook", help="codebook tools: `codebook retrain` (not yet implemented: issue 3)")
    p.set_defaults(handler=_not_yet)
