"""ONNX export of a model directory: uint8 images -> int32 token ids, and back.

- `graphs`: the encoder and decoder graphs as torch modules (the quantizer graphs live beside the
  quantizers: `models/quantizers/vq_graph.py`, `fsq_graph.py`);
- `parity`: the gate that refuses an export unless ONNX Runtime reproduces torch float32;
- `driver`: `export_model`, which writes the graphs and the manifest;
- `cli`: `vqtok export` (argparse only at import time).

Re-exports resolve lazily, so `models.export.cli` can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.artefacts import sha256_file
    from .driver import DEFAULT_OPSET, build_manifest, export_model, git_revision
    from .graphs import DecoderGraph, EncoderGraph, images_to_input, output_to_images
    from .parity import PARITY, ExportError, ParityBounds, check_parity, psnr_uint8

_EXPORTS = {
    "sha256_file": "..core.artefacts",
    **dict.fromkeys(("DEFAULT_OPSET", "build_manifest", "export_model", "git_revision"), ".driver"),
    **dict.fromkeys(("DecoderGraph", "EncoderGraph", "images_to_input", "output_to_images"), ".graphs"),
    **dict.fromkeys(("PARITY", "ExportError", "ParityBounds", "check_parity", "psnr_uint8"), ".parity"),
}

__all__ = [
    "DEFAULT_OPSET",
    "PARITY",
    "DecoderGraph",
    "EncoderGraph",
    "ExportError",
    "ParityBounds",
    "build_manifest",
    "check_parity",
    "export_model",
    "git_revision",
    "images_to_input",
    "output_to_images",
    "psnr_uint8",
    "sha256_file",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'models.export' has no attribute {name!r}")
