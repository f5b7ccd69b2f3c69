"""`vqtok vocab extend` and `vqtok vocab codebook`: what an LLM trainer needs to add a vqtok model's
image tokens to a language model (argparse and the torch-free core only at import time: torch is
imported by the codebook handler, tokenizers by the extend handler)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from models.core.artefacts import DEFAULT_MODEL, resolve_model_dir
from models.core.errors import CLIError, ModelLoadError
from models.core.fileio import atomic_path
from models.core.layouts import DEFAULT_MAX_GRID, LAYOUTS, LayoutError
from models.core.vocab import TOKENIZER_FILE, VOCAB_FILE, VocabError, extend_tokenizer, model_identity

CODEBOOK_KEY = "codebook"  # the tensor's name in the safetensors file


def register(sub: argparse._SubParsersAction) -> None:
    """`vqtok vocab extend`, `vqtok vocab codebook`."""
    p = sub.add_parser(
        "vocab",
        help="LLM vocabularies: `vocab extend` (a text tokenizer plus image tokens), `vocab codebook` (vectors for their embeddings)",
    )
    vsub = p.add_subparsers(dest="vocab_command", metavar="ACTION", required=True)
    e = vsub.add_parser(
        "extend",
        help="add a model's image tokens and a layout's special tokens to a Hugging Face tokenizer.json",
        description=(
            f"Write OUTPUT/{TOKENIZER_FILE} (the text tokenizer with the K image tokens <|img_00000|>... and the layout's special "
            f"tokens added, image code k at id offset + k, offset = the text vocabulary size) and OUTPUT/{VOCAB_FILE} "
            "(offset, K, special ids by name, layout, model name and weights hash). Needs the tokenizers package (vqtok[llm])."
        ),
    )
    e.add_argument("--text-tokenizer", required=True, type=Path, help="the language model's tokenizer.json")
    e.add_argument("--layout", required=True, help=f"sequence layout: {', '.join(LAYOUTS)}")
    e.add_argument(
        "--model", default=None, help=f"model directory or shipped model name whose codebook the tokens name (default {DEFAULT_MODEL})"
    )
    e.add_argument(
        "--max-grid",
        type=int,
        default=DEFAULT_MAX_GRID,
        help=f"largest grid side the layout covers (lumina adds a size token per side up to it; default {DEFAULT_MAX_GRID})",
    )
    e.add_argument("-o", "--output", required=True, type=Path, help="folder to write tokenizer.json and vqtok_vocab.json into")
    e.set_defaults(handler=run_extend)
    c = vsub.add_parser(
        "codebook",
        help="write the model's K code vectors, to initialise the LLM's new image-token embeddings",
        description=(
            f"Write the effective codebook as a K x D float32 tensor {CODEBOOK_KEY!r} in a safetensors file: row k is image code k "
            "(LLM id offset + k). VQ: the codebook (SimVQ: after its linear map); FSQ: the grid point of each index."
        ),
    )
    c.add_argument("--model", default=None, help=f"model directory or shipped model name (default {DEFAULT_MODEL})")
    c.add_argument("-o", "--output", required=True, type=Path, help="the .safetensors file to write")
    c.set_defaults(handler=run_codebook)


def _model_dir(name: str | None) -> Path:
    try:
        return resolve_model_dir(name)
    except ModelLoadError as exc:
        raise CLIError(f"--model: {exc}") from exc


def run_extend(args: argparse.Namespace) -> int:
    if args.layout not in LAYOUTS:
        raise CLIError(f"--layout: unknown layout {args.layout!r}; expected one of {', '.join(LAYOUTS)}")
    if args.output.exists() and not args.output.is_dir():
        raise CLIError(f"--output {args.output} is a file; give a folder")
    model_dir = _model_dir(args.model)
    try:
        model = model_identity(model_dir)
        layout = extend_tokenizer(
            args.text_tokenizer, args.output, args.layout, codebook_size=model.codebook_size, max_grid=args.max_grid, model=model
        )
    except (VocabError, LayoutError, ModelLoadError) as exc:
        raise CLIError(str(exc)) from exc
    except ImportError as exc:
        raise CLIError(str(exc), code=1) from exc
    summary = {
        "output": str(args.output),
        "layout": layout.name,
        "vocab_offset": layout.vocab_offset,
        "codebook_size": layout.codebook_size,
        "vocab_size": layout.vocab_size_needed,
        "model": model.name,
    }
    print(json.dumps(summary))
    return 0


def code_vectors(quantizer: Any) -> Any:
    """The (K, D) float32 vector of every code: `codebook()` where the quantizer has one (VQ, after
    SimVQ's linear map), else its `indices_to_codes` of 0..K-1 (FSQ's implicit grid)."""
    import torch

    with torch.no_grad():
        if hasattr(quantizer, "codebook"):
            return quantizer.codebook().detach().float().cpu().contiguous()
        k = int(quantizer.codebook_size)
        codes = quantizer.indices_to_codes(torch.arange(k).view(1, k, 1))  # (1, D, K, 1)
        return codes[0, :, :, 0].t().float().cpu().contiguous()


def run_codebook(args: argparse.Namespace) -> int:
    model_dir = _model_dir(args.model)
    if args.output.is_dir():
        raise CLIError(f"-o {args.output} is a folder; give a .safetensors file name")
    from safetensors.torch import save_file

    from models.tokenizer import CheckpointError, Tokenizer

    try:
        tok = Tokenizer.from_pretrained(model_dir)
        model = model_identity(model_dir)
    except (CheckpointError, ModelLoadError) as exc:
        raise CLIError(str(exc)) from exc
    vectors = code_vectors(tok.quantizer)
    metadata = {
        "model": model.name,
        "weights_sha256": model.weights_sha256 or "",
        "codebook_size": str(vectors.shape[0]),
        "quantizer": tok.config.quantizer,
        "rows": "row k is image code k, the LLM token of id vocab_offset + k",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.output) as tmp:
        save_file({CODEBOOK_KEY: vectors}, str(tmp), metadata=metadata)
    print(json.dumps({"output": str(args.output), "model": model.name, "shape": list(vectors.shape), "dtype": "float32"}))
    return 0
