"""`vqtok export` (argparse only at import time: torch is imported by the handler)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clients.cli import CLIError

EXIT_PARITY = 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model directory to ONNX (encoder.onnx, decoder.onnx, manifest.json)",
        description="Export a model directory (config.json + model.safetensors) to ONNX, verify parity with torch, write manifest.json.",
    )
    p.add_argument("--model", required=True, type=Path, help="model directory")
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
    if not args.model.is_dir():
        raise CLIError(f"--model {args.model}: no such directory")
    if args.opset < 18:
        raise CLIError(f"--opset {args.opset}: the torch exporter needs opset 18 or newer")
    from models.export import ExportError, export_model
    from models.tokenizer import CheckpointError

    try:
        manifest = export_model(args.model, fp16=args.fp16, opset=args.opset, parity_images=args.parity_images)
    except CheckpointError as exc:
        raise CLIError(str(exc)) from exc
    except ExportError as exc:
        raise CLIError(str(exc), code=EXIT_PARITY) from exc
    for precision, result in manifest["parity"].items():
        if not isinstance(result, dict):
            continue
        for label, fig in result["figures"].items():
            print(f"{precision:5s} {label:18s} tokens {fig['token_agreement']:8.4%}  decoded PSNR {fig['decode_psnr_db']:6.1f} dB")
    print(json.dumps({"model": str(args.model), "files": sorted(manifest["files"]), "revision": manifest["revision"]}))
    return 0
