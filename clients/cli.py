"""`vqtok` command line: one root parser; each package registers its own subcommands with
`register(subparsers)`. This module is a leaf: nothing in vqtok imports it (checked by the
layering contract in pyproject.toml).

The registering modules import only argparse (and the torch-free core) at module level, so
`vqtok serve` and `vqtok tokenize` never import torch; heavy imports happen inside each handler.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from models.core.errors import CLIError


def build_parser() -> argparse.ArgumentParser:
    from clients.tokenize import cli as tokenize_cli
    from models.export import cli as export_cli
    from service import cli as service_cli
    from training import cli as training_cli

    parser = argparse.ArgumentParser(prog="vqtok", description="Image tokenizers: train, evaluate, export, serve, tokenize datasets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    training_cli.register(sub)  # train, eval, codebook
    export_cli.register(sub)
    service_cli.register(sub)
    tokenize_cli.register(sub)
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
