"""ONNX Runtime inference for exported model directories. Torch-free: the service and dataset
tokenization share it. (INTERFACE DRAFT — implementation lands with issue 4.)"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Device = Literal["auto", "cuda", "cpu"]
Precision = Literal["auto", "fp32", "fp16"]


class ModelLoadError(Exception):
    """A model directory that cannot be served: missing/corrupt files, hash mismatch, no ONNX export."""


class InvalidInputError(ValueError):
    """Images or token ids that do not fit the model (shape, dtype, grid, id range)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    codebook_size: int
    downsample: int  # f: token grid is (H/f, W/f); H and W must be multiples of f
    resolution: int  # native training size (the "crop" resize mode uses it)
    quantizer: str  # "vq" or "fsq"
    precision: str  # "fp32" or "fp16": the graphs this runtime runs
    opset: int
    revision: str  # git revision that exported it
    manifest_sha256: str  # hash of manifest.json: identifies the exact artefacts


class ModelRuntime:
    """One model directory, two ORT sessions (encoder, decoder). Thread-safe `encode`/`decode`."""

    info: ModelInfo
    providers: list[str]

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        name: str | None = None,
        device: Device = "auto",
        precision: Precision = "auto",
        intra_op_threads: int | None = None,
    ) -> ModelRuntime:
        raise NotImplementedError

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> int32 token ids (B, H/f, W/f)."""
        raise NotImplementedError

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """integer token ids (B, h, w) in [0, K) -> uint8 images (B, h·f, w·f, 3)."""
        raise NotImplementedError

    def warmup(self, sizes: Sequence[tuple[int, int]], batch_sizes: Sequence[int] = (1,)) -> None:
        raise NotImplementedError
