"""The parity gate: an exported graph is kept only if ONNX Runtime reproduces torch float32 on real
and random images at two sizes, within `PARITY`. Real photos are prepared by the one pixel rule
(`models.core.pixels`), exactly as the service and training see them."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TokenizerConfig
from ..core import gate, pixels
from ..core.gate import PSNR_CAP_DB, ParitySet, psnr_uint8
from ..tokenizer import Tokenizer
from .graphs import images_to_input, output_to_images


class ExportError(RuntimeError):
    """Export failed: the exporter broke, onnx.checker refused the graph, or parity was not met
    (`parity_precision`: the precision whose graphs missed it)."""

    def __init__(self, message: str, parity_precision: str | None = None) -> None:
        super().__init__(message)
        self.parity_precision = parity_precision


@dataclass(frozen=True)
class ParityBounds:
    min_token_agreement: float  # fraction of token ids equal to torch float32's
    min_decode_psnr_db: float  # PSNR of ORT's decoded uint8 image against torch's


PARITY = {"fp32": ParityBounds(0.999, 50.0), "fp16": ParityBounds(0.99, 40.0)}
__all__ = ["PARITY", "PSNR_CAP_DB", "ExportError", "ParityBounds", "psnr_uint8"]


def parity_sizes(config: TokenizerConfig) -> list[tuple[int, int]]:
    """Two sizes, multiples of f: the native square and a non-square one (3/4 × 5/4 of it)."""
    f, r = config.downsample, config.resolution
    return [(r, r), (max(f, (3 * r // 4) // f * f), max(f, (5 * r // 4) // f * f))]


def real_parity_images(paths: Sequence[Path], size: tuple[int, int], count: int) -> np.ndarray:
    """Up to `count` photos decoded by the pixel rule and fitted (cover + centre crop) to `size`."""
    out = []
    for p in list(paths)[:count]:
        im, _ = pixels.decode_image(p.read_bytes())
        out.append(np.asarray(pixels.fit(im, size[0], size[1]), dtype=np.uint8))
    return np.stack(out)


def find_parity_images(directory: str | Path | None) -> list[Path]:
    """Real photos to check parity on: --parity-images, $VQTOK_PARITY_IMAGES, or ../shared/data/kodak."""
    repo_data = Path(__file__).resolve().parents[3] / "shared" / "data" / "kodak"  # ../shared beside the checkout
    candidates = [directory, os.environ.get("VQTOK_PARITY_IMAGES"), repo_data]
    for cand in candidates:
        if cand is None:
            continue
        d = Path(cand)
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in pixels.IMAGE_EXTENSIONS) if d.is_dir() else []
        if files:
            return files
        if directory is not None and cand == directory:
            raise ExportError(f"--parity-images {directory}: no PNG/JPEG/WebP/BMP images found there")
    return []


def parity_image_sets(config: TokenizerConfig, real: list[Path], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sets: dict[str, np.ndarray] = {}
    for h, w in parity_sizes(config):
        if real:
            sets[f"real_{h}x{w}"] = real_parity_images(real, (h, w), count=8)
        sets[f"random_{h}x{w}"] = rng.integers(0, 256, size=(2, h, w, 3), dtype=np.uint8)
    return sets


def torch_references(tok: Tokenizer, image_sets: dict[str, np.ndarray]) -> dict[str, ParitySet]:
    """The torch float32 reference on every image set (tokens, and the decode of those tokens),
    computed once per export and shared by every precision's gate and the stored parity set."""
    refs: dict[str, ParitySet] = {}
    with torch.no_grad():
        for label, images in image_sets.items():
            ids = tok.encode(images_to_input(torch.from_numpy(images)))
            decoded = output_to_images(tok.decoder(tok.quantizer.indices_to_codes(ids))).numpy()
            refs[label] = ParitySet(images, ids.numpy().astype(np.int32), decoded)
    return refs


def check_parity(files: dict[str, Path], precision: str, references: dict[str, ParitySet]) -> dict[str, Any]:
    """Run ORT (CPU) against the torch float32 references on every image set; returns the figures per set."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    enc = ort.InferenceSession(str(files["encoder"]), opts, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(files["decoder"]), opts, providers=["CPUExecutionProvider"])
    figures: dict[str, Any] = {}
    for label, ref in references.items():
        ids = enc.run(None, {"images": ref.images})[0]
        out = dec.run(None, {"tokens": ref.tokens})[0]
        if ids.dtype != np.int32 or ids.shape != ref.tokens.shape:
            raise ExportError(f"{precision} encoder returned {ids.dtype}{ids.shape}, expected int32{ref.tokens.shape}")
        if out.dtype != np.uint8 or out.shape != ref.images.shape:
            raise ExportError(f"{precision} decoder returned {out.dtype}{out.shape}, expected uint8{ref.images.shape}")
        figures[label] = {
            "token_agreement": float((ids == ref.tokens).mean()),
            "decode_psnr_db": psnr_uint8(out, ref.decoded),
            "images": int(ref.images.shape[0]),
            "size": list(ref.images.shape[1:3]),
        }
    return figures


def parity_failures(figures: dict[str, Any], bounds: ParityBounds) -> list[str]:
    bad = []
    for label, fig in figures.items():
        if fig["token_agreement"] < bounds.min_token_agreement:
            bad.append(f"{label}: token agreement {fig['token_agreement']:.4%} < {bounds.min_token_agreement:.1%}")
        if fig["decode_psnr_db"] < bounds.min_decode_psnr_db:
            bad.append(f"{label}: decoded PSNR {fig['decode_psnr_db']:.1f} dB < {bounds.min_decode_psnr_db:.0f} dB")
    return bad


def format_parity(parity: dict[str, Any]) -> str:
    """The parity table, one line per precision and image set."""
    lines = []
    for precision, result in parity.items():
        if precision == "gpu" and isinstance(result, dict):
            for runtime, fig in result.items():
                verdict = "ok" if fig.get("passed") else "REFUSED at load"
                lines.append(
                    f"GPU   {runtime:24s} tokens {fig['token_agreement']:8.4%}  decoded PSNR {fig['decode_psnr_db']:6.1f} dB  {verdict}"
                )
            continue
        if not isinstance(result, dict):
            continue
        for label, fig in result["figures"].items():
            lines.append(f"{precision:5s} {label:18s} tokens {fig['token_agreement']:8.4%}  decoded PSNR {fig['decode_psnr_db']:6.1f} dB")
    return "\n".join(lines)


def check_gpu_parity(tok: Tokenizer, graphs: dict[str, dict[str, Path]], reference: ParitySet) -> dict[str, Any]:
    """The GPU gate at export: every GPU runtime this host has (ONNX Runtime's CUDA EP with each
    exported precision, the compiled graphs) against the CPU float32 reference on the real photos.
    Returns the figures of each (with `passed`); ExportError when none passes."""
    import onnxruntime as ort

    figures: dict[str, Any] = {}
    if "CUDAExecutionProvider" in ort.get_available_providers():
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        for precision, files in graphs.items():
            cuda = {"use_tf32": "0"} if precision == "fp32" else {}  # as the runtime loads them (`ModelRuntime.load`)
            providers: list[Any] = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
            enc = ort.InferenceSession(str(files["encoder"]), opts, providers=providers)
            dec = ort.InferenceSession(str(files["decoder"]), opts, providers=providers)

            def run_enc(x: np.ndarray, s: Any = enc) -> np.ndarray:
                return s.run(None, {"images": x})[0]

            def run_dec(t: np.ndarray, s: Any = dec) -> np.ndarray:
                return s.run(None, {"tokens": t})[0]

            figures[f"onnxruntime-cuda-{precision}"] = gate.measure(run_enc, run_dec, reference)
    if torch.cuda.is_available():
        from .compiled import compiled_graphs, precision_flags

        device = torch.device("cuda")
        for precision in ("fp16", "fp32"):  # the compiled runtime's ladder: fp32 only where fp16 fails
            compiled = compiled_graphs(tok, device, precision=precision)

            def encode(x: np.ndarray, c: Any = compiled) -> np.ndarray:
                with torch.no_grad(), precision_flags(c):
                    return c.encoder(torch.from_numpy(x).to(device)).cpu().numpy()

            def decode(t: np.ndarray, c: Any = compiled) -> np.ndarray:
                with torch.no_grad(), precision_flags(c):
                    return c.decoder(torch.from_numpy(t).to(device)).cpu().numpy()

            figures[f"compiled-{precision}"] = fig = gate.measure(encode, decode, reference)
            if not gate.failures(fig, gate.GPU_PARITY):
                break
    for fig in figures.values():
        fig["passed"] = not gate.failures(fig, gate.GPU_PARITY)
    if figures and not any(f["passed"] for f in figures.values()):
        raise ExportError(
            "no GPU runtime reproduces the CPU float32 reference within the gate "
            f"(tokens >= {gate.GPU_PARITY.min_token_agreement:.1%}, decoded >= {gate.GPU_PARITY.min_decode_psnr_db:.0f} dB); "
            f"nothing was written: {json.dumps(figures)}"
        )
    return figures
