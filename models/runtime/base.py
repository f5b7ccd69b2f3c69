"""The contract every runtime of an exported model answers: the service's batcher, the local backend and
dataset tokenization call these and nothing else, so a runtime can be added without touching them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from models.core.artefacts import ModelInfo


class Runtime(Protocol):
    info: ModelInfo  # the model's artefact facts: name, codebook size, downsample, precision, hashes
    device: str  # "cuda" or "cpu": where the networks run
    runtime_name: str  # e.g. "onnxruntime 1.32.0", "compiled torch 2.11.0" (reported by /v1/models)
    providers: list[str]  # what executes it, most preferred first

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3), H and W multiples of `info.downsample` -> int32 token ids (B, H/f, W/f)."""
        ...

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """integer token ids (B, h, w) in [0, K) -> uint8 images (B, h·f, w·f, 3)."""
        ...

    def check_images(self, images: np.ndarray) -> None:
        """Raise InvalidInputError for images `encode` would refuse (cheap: shape and dtype only)."""
        ...

    def check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """The validated int32 grid `decode` runs, or InvalidInputError."""
        ...

    def warmup(
        self, sizes: Sequence[tuple[int, int]], batch_sizes: Sequence[int] | None = None, parts: Sequence[str] = ("encode", "decode")
    ) -> None:
        """Run each (batch, image size) of the graphs in `parts` once, so that no request pays a compile or
        algorithm search; `batch_sizes` None: every batch size the runtime runs."""
        ...

    def close(self) -> None:
        """Hand back sessions, graphs and device memory; the runtime cannot run afterwards."""
        ...
