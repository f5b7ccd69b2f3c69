"""The parity gate: an exported graph is kept only if ONNX Runtime reproduces torch float32 on real
and random images at two sizes, within `PARITY`. Real photos are prepared by the one pixel rule
(`models.core.pixels`), exactly as the service and training see them. Token ids that differ only
because the latent lies on the boundary between two codes (argmin near-ties, `near_tie_mask` in
`models.quantizers.functional`: float32 rounding decides them) are counted and excused."""

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
from ..quantizers import VectorQuantizer
from ..quantizers.functional import TIE_LATENT, TIE_SEARCH, l2norm, near_ties
from ..tokenizer import Tokenizer
from .graphs import images_to_input, output_to_images


class ExportError(RuntimeError):
    """Export failed: the exporter broke, onnx.checker refused the graph, or parity was not met."""


@dataclass(frozen=True)
class ParityBounds:
    min_token_agreement: float  # fraction of token ids equal to torch float32's, near-ties excused
    min_decode_psnr_db: float  # PSNR of ORT's decoded uint8 image against torch's


PARITY = {"fp32": ParityBounds(0.999, 50.0), "fp16": ParityBounds(0.99, 40.0)}
NEAR_TIE_RULE = {"latent": TIE_LATENT, "search": TIE_SEARCH}  # recorded beside the bounds in the manifest
__all__ = ["NEAR_TIE_RULE", "PARITY", "PSNR_CAP_DB", "ExportError", "ParityBounds", "Reference", "psnr_uint8"]


@dataclass(frozen=True)
class Reference(ParitySet):
    """A parity set plus what near-ties are judged on, for a codebook (VQ) model: the float32 latents
    (B, D, h, w) as the code search saw them and the (K, D) codebook. None for FSQ: its rounding has no
    near-tie notion here, so every mismatch counts."""

    latents: np.ndarray | None = None
    codebook: np.ndarray | None = None

    def near_ties(self, ids: np.ndarray) -> int:
        if self.latents is None or self.codebook is None:
            return 0
        return near_ties(
            torch.from_numpy(self.latents), torch.from_numpy(self.codebook), torch.from_numpy(ids), torch.from_numpy(self.tokens)
        )


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


def torch_references(tok: Tokenizer, image_sets: dict[str, np.ndarray]) -> dict[str, Reference]:
    """The torch float32 reference on every image set (tokens, the decode of those tokens and, for a
    codebook, the latents and codebook near-ties are judged on), computed once per export and shared
    by every precision's gate and the stored parity set."""
    refs: dict[str, Reference] = {}
    q = tok.quantizer
    codebook = q.codebook().detach().float().numpy() if isinstance(q, VectorQuantizer) else None
    with torch.no_grad():
        for label, images in image_sets.items():
            x = images_to_input(torch.from_numpy(images))
            tok.check_images(x)
            z = tok.encoder(x)
            ids = q(z).indices  # = tok.encode(x)
            decoded = output_to_images(tok.decoder(q.indices_to_codes(ids))).numpy()
            latents = None
            if isinstance(q, VectorQuantizer):
                zf = z.float()
                latents = (l2norm(zf, dim=1) if q.cosine else zf).numpy()  # as the search sees them
            refs[label] = Reference(images, ids.numpy().astype(np.int32), decoded, latents=latents, codebook=codebook)
    return refs


def check_parity(files: dict[str, Path], precision: str, references: dict[str, Reference]) -> dict[str, Any]:
    """Run ORT (CPU) against the torch float32 references on every image set; returns the figures per set:
    `token_agreement` (ids equal to torch's), `mismatches`, how many of them are `near_ties`, and
    `agreement_with_ties` (the ties counted as agreeing: what `parity_failures` gates on)."""
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
        mismatches = int((ids != ref.tokens).sum())
        ties = ref.near_ties(ids)
        figures[label] = {
            "token_agreement": float((ids == ref.tokens).mean()),
            "mismatches": mismatches,
            "near_ties": ties,
            "agreement_with_ties": 1.0 - (mismatches - ties) / ids.size,
            "decode_psnr_db": psnr_uint8(out, ref.decoded),
            "images": int(ref.images.shape[0]),
            "size": list(ref.images.shape[1:3]),
        }
    return figures


def parity_failures(figures: dict[str, Any], bounds: ParityBounds) -> list[str]:
    bad = []
    for label, fig in figures.items():
        if fig["agreement_with_ties"] < bounds.min_token_agreement:
            bad.append(
                f"{label}: token agreement {fig['token_agreement']:.4%} ({fig['mismatches']} differ, {fig['near_ties']} of them "
                f"near-ties), {fig['agreement_with_ties']:.4%} with the ties excused < {bounds.min_token_agreement:.1%}"
            )
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
            ties = f"  ({fig['near_ties']} of {fig['mismatches']} differing near-ties)" if fig.get("near_ties") else ""
            lines.append(
                f"{precision:5s} {label:18s} tokens {fig['token_agreement']:8.4%}  decoded PSNR {fig['decode_psnr_db']:6.1f} dB{ties}"
            )
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
