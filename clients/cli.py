"""`vqtok` command line: one root parser; each package registers its own subcommands.

The registering modules import only argparse at module level, so `vqtok serve` and
`vqtok tokenize` never import torch; heavy imports happen inside each handler.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error the CLI reports in one line, with exit code `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    from clients import tokenize_cli
    from models import export_cli
    from service import cli as service_cli
    from training import cli as training_cli

    parser = argparse.ArgumentParser(prog="vqtok", description="Image tokenizers: train, evaluate, export, serve, tokenize datasets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    training_cli.register_train(sub)
    training_cli.register_eval(sub)
    export_cli.register(sub)
    service_cli.register(sub)
    tokenize_cli.register(sub)
    training_cli.register_codebook(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except CLIError as exc:
        print(f"vqtok {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"vqtok {args.command}: interrupted", file=sys.stderr)
        return 130
