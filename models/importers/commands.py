"""`vqtok import` (argparse and the torch-free core only at import time: torch and diffusers are
imported by the handler)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from models.core.errors import EXIT_USAGE, CLIError

EXIT_PARITY = 3  # as `vqtok export`: the model was read but not reproduced within the gate
FORMATS = ("diffusers",)
# a model's name is its folder in a model repository, and the name the service serves it under
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*", re.ASCII)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="turn a tokenizer of another library (diffusers VQModel) into a vqtok model directory",
        description=(
            "Import diffusers' VQModel (latent-diffusion VQ-f4/f8, aMUSEd's VQGAN, Kandinsky's MoVQ) as an ordinary vqtok "
            "model directory, OUTPUT/NAME: config.json (with its source), model.safetensors, model cards, the ONNX "
            "export and manifest. The ids and decodes are checked against diffusers first; a config field vqtok cannot "
            "reproduce exactly is refused by name. Needs the diffusers extra: pip install 'vqtok[diffusers]'."
        ),
    )
    p.add_argument("source", metavar="diffusers:PATH_OR_HUB_ID", help="a local diffusers model folder, or a hub id ORG/NAME")
    p.add_argument("--name", required=True, help="the model's name: its folder under --output, and what the service calls it")
    p.add_argument("--output", required=True, type=Path, help="model repository to write OUTPUT/NAME into (created if missing)")
    p.add_argument("--subfolder", default=None, help="the VQModel's folder inside the repository (aMUSEd: vqvae, Kandinsky: movq)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit (default main)")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="native image size, a multiple of the downsample factor (default 256; diffusers' sample_size is not one for VQModels)",
    )
    p.add_argument(
        "--fp16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also export float16 graphs (default: yes, unless the source sets force_upcast)",
    )
    p.add_argument(
        "--parity-images",
        type=Path,
        default=None,
        help="folder of real photos for the parity checks (default: $VQTOK_PARITY_IMAGES or ../shared/data/kodak)",
    )
    p.set_defaults(handler=run)


def split_source(text: str) -> tuple[str, str]:
    """`FORMAT:LOCATION` -> (format, location), or CLIError."""
    kind, sep, location = text.partition(":")
    if not sep or kind not in FORMATS or not location:
        raise CLIError(f"{text}: expected FORMAT:PATH_OR_HUB_ID with FORMAT one of {', '.join(FORMATS)} (e.g. diffusers:amused/amused-256)")
    return kind, location


def run(args: argparse.Namespace) -> int:
    _, location = split_source(args.source)
    if not _NAME.fullmatch(args.name):
        raise CLIError(f"--name {args.name!r}: a folder name of letters, digits, '.', '_' and '-' (not starting with '.' or '-')")
    if args.resolution is not None and args.resolution < 1:
        raise CLIError(f"--resolution {args.resolution}: must be positive")
    from .diffusers import ImportFailed, ParityFailed, import_vqmodel

    try:
        result = import_vqmodel(
            location,
            name=args.name,
            output=args.output,
            subfolder=args.subfolder,
            revision=args.revision,
            resolution=args.resolution,
            fp16=args.fp16,
            parity_images=args.parity_images,
        )
    except ImportFailed as exc:
        raise CLIError(str(exc), code=EXIT_PARITY if isinstance(exc, ParityFailed) else EXIT_USAGE) from exc
    except ModuleNotFoundError as exc:  # torch itself, before the importer could say which extra
        raise CLIError(f"importing from diffusers needs {exc.name}, which this install lacks: pip install 'vqtok[diffusers]'") from exc
    from models.export.parity import format_parity

    p = result.parity
    print(
        f"diffusers parity: ids {p['token_agreement']:.4%} ({p['mismatches']} differ, {p['near_ties']} near-ties), "
        f"decodes {p['decode_psnr_db']:.1f} dB from diffusers' decode of the same ids"
    )
    print(format_parity(result.manifest["parity"]))
    seconds = {k: round(v, 2) for k, v in result.seconds.items()}
    print(json.dumps({"model": str(result.model_dir), "files": sorted(result.manifest["files"]), "seconds": seconds}))
    return 0
