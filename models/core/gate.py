"""The parity gate a runtime must pass on a GPU: on the model's own set of real photos, its tokens
agree with the CPU float32 reference on at least `GPU_PARITY.min_token_agreement` of positions and
its decoded images are at least `GPU_PARITY.min_decode_psnr_db` against the reference decode.

`vqtok export` writes the set (`parity.npz`: real photos, the CPU float32 tokens and decodes) into
the model directory; every runtime that loads on a GPU measures itself against it before serving
and is refused with the numbers when it falls short. Torch-free (numpy only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artefacts import read_manifest, verify_files
from .errors import ModelLoadError

PARITY_FILE = "parity.npz"
PSNR_CAP_DB = 100.0  # reported for identical images (keeps JSON finite)


@dataclass(frozen=True)
class ParityBounds:
    min_token_agreement: float  # fraction of token ids equal to the reference's
    min_decode_psnr_db: float  # PSNR of the decoded uint8 images against the reference decode


GPU_PARITY = ParityBounds(0.995, 45.0)


@dataclass(frozen=True)
class ParitySet:
    images: np.ndarray  # uint8 (N, H, W, 3): real photos
    tokens: np.ndarray  # int32 (N, H/f, W/f): CPU float32 reference tokens
    decoded: np.ndarray  # uint8 (N, H, W, 3): CPU float32 decode of `tokens`


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / mse))


def write_parity_set(path: Path, parity: ParitySet) -> None:
    np.savez_compressed(path, images=parity.images, tokens=parity.tokens, decoded=parity.decoded)


def read_parity_set(model_dir: Path) -> ParitySet | None:
    """The model's parity set, verified against the manifest's hash, or None for a model exported
    before it existed."""
    path = model_dir / PARITY_FILE
    if not path.is_file():
        return None
    manifest, _ = read_manifest(model_dir)
    verify_files(model_dir, manifest, [PARITY_FILE])
    try:
        with np.load(path, allow_pickle=False) as z:
            return ParitySet(z["images"], z["tokens"].astype(np.int32), z["decoded"])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path} is unreadable ({exc}); re-run `vqtok export --model {model_dir}`") from exc


def measure(encode: Callable[[np.ndarray], np.ndarray], decode: Callable[[np.ndarray], np.ndarray], parity: ParitySet) -> dict[str, float]:
    """A runtime's agreement with the reference on the parity set."""
    tokens = np.asarray(encode(parity.images))
    decoded = np.asarray(decode(parity.tokens))
    return {
        "token_agreement": float((tokens == parity.tokens).mean()) if tokens.shape == parity.tokens.shape else 0.0,
        "decode_psnr_db": psnr_uint8(decoded, parity.decoded) if decoded.shape == parity.decoded.shape else 0.0,
        "images": len(parity.images),
    }


def failures(figures: dict[str, float], bounds: ParityBounds) -> list[str]:
    bad = []
    if figures["token_agreement"] < bounds.min_token_agreement:
        bad.append(f"token agreement {figures['token_agreement']:.4%} < {bounds.min_token_agreement:.1%}")
    if figures["decode_psnr_db"] < bounds.min_decode_psnr_db:
        bad.append(f"decoded PSNR {figures['decode_psnr_db']:.1f} dB < {bounds.min_decode_psnr_db:.0f} dB")
    return bad


def enforce(figures: dict[str, float], what: str, bounds: ParityBounds = GPU_PARITY) -> None:
    """Raise ModelLoadError naming the numbers when `figures` fall short of `bounds`."""
    bad = failures(figures, bounds)
    if bad:
        raise ModelLoadError(
            f"{what} does not reproduce the CPU float32 reference on the model's {figures.get('images', 0)} parity photos: "
            + "; ".join(bad)
        )
