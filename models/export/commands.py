"""`vqtok export` (argparse and the torch-free core only at import time: torch is imported by the handler)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.core.artefacts import resolve_model_dir
from models.core.errors import CLIError, ModelNotFound

EXIT_PARITY = 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model directory to ONNX (encoder.onnx, decoder.onnx, manifest.json)",
        description="Export a model directory (config.json + model.safetensors) to ONNX, verify parity with torch, write manifest.json.",
    )
    p.add_argument("--model", required=True, help="model directory, or the name of a shipped model")
    p.add_argument("--fp16", action="store_true", help="also write fp16 graphs (networks in half, quantizer in float32)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18; the exporter needs >= 18)")
    p.add_argument(
        "--parity-images",
        type=Path,
        default=None,
        help="folder of real photos for the parity check (default: $VQTOK_PARITY_IMAGES or ../shared/data/kodak)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        model_dir = resolve_model_dir(args.model)
    except ModelNotFound as exc:
        raise CLIError(f"--model: {exc}") from exc
    if args.opset < 18:
        raise CLIError(f"--opset {args.opset}: the torch exporter needs opset 18 or newer")
    from models.export.driver import export_model
    from models.export.parity import ExportError
    from models.tokenizer import CheckpointError

    try:
        manifest = export_model(model_dir, fp16=args.fp16, opset=args.opset, parity_images=args.parity_images)
    except CheckpointError as exc:
        raise CLIError(str(exc)) from exc
    except ExportError as exc:
        raise CLIError(str(exc), code=EXIT_PARITY) from exc
    from models.export.parity import format_parity

    print(format_parity(manifest["parity"]))
    print(json.dumps({"model": str(model_dir), "files": sorted(manifest["files"]), "revision": manifest["revision"]}))
    return 0
