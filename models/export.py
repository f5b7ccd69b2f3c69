"""ONNX export of a model directory: uint8 images -> int32 token ids, and back.

The graphs carry the whole inference contract so that ONNX Runtime needs nothing else:
- encoder.onnx: images uint8 (B, H, W, 3) -> tokens int32 (B, H/f, W/f). Normalisation to
  [-1, 1] and the quantizer (nearest-code search against the effective codebook C·W folded into
  one constant, or FSQ's bound, rounding and index arithmetic) are inside the graph.
- decoder.onnx: tokens int32 (B, h, w) -> images uint8 (B, h·f, w·f, 3), clamp and round inside.
Batch, height and width are dynamic. fp16 variants run the networks in half precision and keep
the quantizer in float32 (distances in fp16 would flip near-tied codes).

Export refuses to finish unless ONNX Runtime reproduces torch float32 on real and random images
at two sizes (`PARITY`); nothing is written into the model directory until that holds.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import math
import os
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# One definition of the manifest's name, format tag and file hash, shared with the runtime that reads it.
from service.runtime import MANIFEST_FILE, MANIFEST_FORMAT, sha256_file

from .config import TokenizerConfig
from .quantizers import FSQ, VectorQuantizer
from .quantizers.fsq import fsq_bound_constants
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
DEFAULT_OPSET = 18
SEARCH_CHUNK = 4096  # codes per distance block in the graph: ORT holds N×4096 scores at a time, not N×K
GRAPH_FILES = {
    "fp32": {"encoder": "encoder.onnx", "decoder": "decoder.onnx"},
    "fp16": {"encoder": "encoder.fp16.onnx", "decoder": "decoder.fp16.onnx"},
}


@dataclass(frozen=True)
class ParityBounds:
    min_token_agreement: float  # fraction of token ids equal to torch float32's
    min_decode_psnr_db: float  # PSNR of ORT's decoded uint8 image against torch's


PARITY = {"fp32": ParityBounds(0.999, 50.0), "fp16": ParityBounds(0.99, 40.0)}


class ExportError(RuntimeError):
    """Export failed: the exporter broke, onnx.checker refused the graph, or parity was not met."""


# --- graphs -------------------------------------------------------------------------------


def images_to_input(images: Tensor) -> Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]: the tokenizer's preprocessing."""
    return images.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0


def output_to_images(y: Tensor) -> Tensor:
    """float (B, 3, H, W), nominally [-1, 1] -> uint8 (B, H, W, 3), clamped and rounded."""
    y = ((y.clamp(-1.0, 1.0) + 1.0) * 127.5).round().clamp(0, 255)
    return y.to(torch.uint8).permute(0, 2, 3, 1)


class _QuantizerConstants(nn.Module):
    """The quantizer frozen into graph constants: VQ's effective codebook or FSQ's arithmetic."""

    levels: Tensor
    half_l: Tensor
    offset: Tensor
    shift: Tensor
    half_width: Tensor
    basis: Tensor
    codebook: Tensor
    codebook_sq: Tensor

    def __init__(self, quantizer: VectorQuantizer | FSQ, search_chunk: int) -> None:
        super().__init__()
        self.is_fsq = isinstance(quantizer, FSQ)
        self.search_chunk = search_chunk
        if isinstance(quantizer, FSQ):
            levels = quantizer.levels.detach().clone()
            half_l, offset, shift = fsq_bound_constants(levels)
            self.register_buffer("levels", levels)
            self.register_buffer("half_l", half_l)
            self.register_buffer("offset", offset)
            self.register_buffer("shift", shift)
            self.register_buffer("half_width", quantizer.half_width.detach().clone())
            self.register_buffer("basis", quantizer.basis.detach().clone().float())
            self.cosine = False
        else:
            codebook = quantizer.codebook().detach().float().clone()  # C·W folded into one constant
            self.register_buffer("codebook", codebook)
            self.register_buffer("codebook_sq", codebook.pow(2).sum(-1))
            self.cosine = quantizer.cosine

    def indices(self, z: Tensor) -> Tensor:
        """(B, D, h, w) float32 latents -> (B, h, w) int32 ids."""
        b, d, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(b, h * w, d)
        if self.is_fsq:
            bounded = torch.tanh(zf + self.shift) * self.half_l - self.offset
            digits = torch.round(bounded) + self.half_width
            ids = (digits * self.basis).sum(-1)
            return torch.round(ids).to(torch.int32).reshape(b, h, w)
        if self.cosine:
            zf = F.normalize(zf, dim=-1)
        best_val: Tensor | None = None
        best_idx: Tensor | None = None
        k = self.codebook.shape[0]
        for start in range(0, k, self.search_chunk):  # static: K is a constant of the graph
            cb = self.codebook[start : start + self.search_chunk]
            scores = self.codebook_sq[start : start + self.search_chunk] - 2.0 * (zf @ cb.t())  # (B, N, Kc)
            val, idx = scores.min(dim=-1)
            idx = idx + start
            if best_val is None or best_idx is None:
                best_val, best_idx = val, idx
            else:
                better = val < best_val  # strict: ties keep the lower index, like argmin
                best_val = torch.where(better, val, best_val)
                best_idx = torch.where(better, idx, best_idx)
        assert best_idx is not None
        return best_idx.to(torch.int32).reshape(b, h, w)

    def codes(self, tokens: Tensor) -> Tensor:
        """(B, h, w) int ids -> (B, D, h, w) float32 codes."""
        ids = tokens.to(torch.int64)
        if self.is_fsq:
            digits = torch.remainder(
                torch.div(ids.unsqueeze(-1), self.basis.to(torch.int64), rounding_mode="floor"), self.levels.to(torch.int64)
            )
            codes = (digits.to(torch.float32) - self.half_width) / self.half_width
        else:
            codes = F.embedding(ids, self.codebook)
        return codes.permute(0, 3, 1, 2)


class EncoderGraph(nn.Module):
    def __init__(self, tok: Tokenizer, half: bool, search_chunk: int = SEARCH_CHUNK) -> None:
        super().__init__()
        self.half_precision = half
        self.encoder = copy.deepcopy(tok.encoder).float()
        if half:
            self.encoder = self.encoder.half()
        self.quant = _QuantizerConstants(tok.quantizer, search_chunk)

    def forward(self, images: Tensor) -> Tensor:
        x = images_to_input(images)
        z = self.encoder(x.half() if self.half_precision else x).float()
        return self.quant.indices(z)


class DecoderGraph(nn.Module):
    def __init__(self, tok: Tokenizer, half: bool, search_chunk: int = SEARCH_CHUNK) -> None:
        super().__init__()
        self.half_precision = half
        self.decoder = copy.deepcopy(tok.decoder).float()
        if half:
            self.decoder = self.decoder.half()
        self.quant = _QuantizerConstants(tok.quantizer, search_chunk)

    def forward(self, tokens: Tensor) -> Tensor:
        codes = self.quant.codes(tokens)
        y = self.decoder(codes.half() if self.half_precision else codes).float()
        return output_to_images(y)


# --- export -------------------------------------------------------------------------------


def _export_graph(
    module: nn.Module, example: Tensor, path: Path, input_name: str, output_name: str, spatial_multiple: int, opset: int
) -> None:
    dim = torch.export.Dim
    batch = dim("batch", min=1, max=4096)
    height, width = dim("height_units", min=1, max=8192), dim("width_units", min=1, max=8192)
    dynamic = {input_name: {0: batch, 1: spatial_multiple * height, 2: spatial_multiple * width}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module.eval(),
                (example,),
                str(path),
                dynamo=True,
                external_data=False,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes={"images" if input_name == "images" else "tokens": dynamic[input_name]},
                opset_version=opset,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; the user needs the message
            raise ExportError(f"torch.onnx.export failed for {path.name}: {exc}") from exc
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected {path.name}: {exc}") from exc


def git_revision() -> str:
    """The exporting source's git revision ("-dirty" if modified), or "unknown" outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --- parity -------------------------------------------------------------------------------


def parity_sizes(config: TokenizerConfig) -> list[tuple[int, int]]:
    """Two sizes, multiples of f: the native square and a non-square one (3/4 × 5/4 of it)."""
    f, r = config.downsample, config.resolution
    return [(r, r), (max(f, (3 * r // 4) // f * f), max(f, (5 * r // 4) // f * f))]


def _real_parity_images(paths: Sequence[Path], size: tuple[int, int], count: int) -> np.ndarray:
    from PIL import Image, ImageOps

    out = []
    for p in list(paths)[:count]:
        with Image.open(p) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
            out.append(np.asarray(ImageOps.fit(rgb, (size[1], size[0]), Image.Resampling.BICUBIC)))
    return np.stack(out)


def find_parity_images(directory: str | Path | None) -> list[Path]:
    """Real photos to check parity on: --parity-images, $VQTOK_PARITY_IMAGES, or ../shared/data/kodak."""
    repo_data = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"  # ../shared beside the checkout
    candidates = [directory, os.environ.get("VQTOK_PARITY_IMAGES"), repo_data]
    for cand in candidates:
        if cand is None:
            continue
        d = Path(cand)
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}) if d.is_dir() else []
        if files:
            return files
        if directory is not None and cand == directory:
            raise ExportError(f"--parity-images {directory}: no PNG/JPEG/WebP images found there")
    return []


PSNR_CAP_DB = 100.0  # reported for identical images (keeps the manifest valid JSON)


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / mse))


def check_parity(tok: Tokenizer, files: dict[str, Path], precision: str, image_sets: dict[str, np.ndarray]) -> dict[str, Any]:
    """Run ORT (CPU) against torch float32 on every image set; returns the figures per set."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    enc = ort.InferenceSession(str(files["encoder"]), opts, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(files["decoder"]), opts, providers=["CPUExecutionProvider"])
    figures: dict[str, Any] = {}
    for label, images in image_sets.items():
        with torch.no_grad():
            ref_ids = tok.encode(images_to_input(torch.from_numpy(images)))
            ref_img = output_to_images(tok.decoder(tok.quantizer.indices_to_codes(ref_ids))).numpy()
        ids = enc.run(None, {"images": images})[0]
        out = dec.run(None, {"tokens": ref_ids.numpy().astype(np.int32)})[0]
        if ids.dtype != np.int32 or ids.shape != tuple(ref_ids.shape):
            raise ExportError(f"{precision} encoder returned {ids.dtype}{ids.shape}, expected int32{tuple(ref_ids.shape)}")
        if out.dtype != np.uint8 or out.shape != images.shape:
            raise ExportError(f"{precision} decoder returned {out.dtype}{out.shape}, expected uint8{images.shape}")
        figures[label] = {
            "token_agreement": float((ids == ref_ids.numpy()).mean()),
            "decode_psnr_db": psnr_uint8(out, ref_img),
            "images": int(images.shape[0]),
            "size": list(images.shape[1:3]),
        }
    return figures


def _parity_failures(figures: dict[str, Any], bounds: ParityBounds) -> list[str]:
    bad = []
    for label, fig in figures.items():
        if fig["token_agreement"] < bounds.min_token_agreement:
            bad.append(f"{label}: token agreement {fig['token_agreement']:.4%} < {bounds.min_token_agreement:.1%}")
        if fig["decode_psnr_db"] < bounds.min_decode_psnr_db:
            bad.append(f"{label}: decoded PSNR {fig['decode_psnr_db']:.1f} dB < {bounds.min_decode_psnr_db:.0f} dB")
    return bad


def _parity_image_sets(config: TokenizerConfig, real: list[Path], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sets: dict[str, np.ndarray] = {}
    for h, w in parity_sizes(config):
        if real:
            sets[f"real_{h}x{w}"] = _real_parity_images(real, (h, w), count=8)
        sets[f"random_{h}x{w}"] = rng.integers(0, 256, size=(2, h, w, 3), dtype=np.uint8)
    return sets


# --- entry point --------------------------------------------------------------------------


def export_model(
    model_dir: str | Path,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    parity_images: str | Path | None = None,
    search_chunk: int = SEARCH_CHUNK,
) -> dict[str, Any]:
    """Export `model_dir` (config.json + model.safetensors) to ONNX in place; returns the manifest.

    Raises ExportError (with the parity figures) if ORT does not reproduce torch within `PARITY`.
    """
    model_dir = Path(model_dir)
    revision = git_revision()  # before this export rewrites tracked files in a checkout
    tok = Tokenizer.from_pretrained(model_dir).eval().float()
    cfg = tok.config
    real = find_parity_images(parity_images)
    if not real:
        log.warning("no real images found for the parity check (--parity-images, $VQTOK_PARITY_IMAGES); checking random images only")
    image_sets = _parity_image_sets(cfg, real)
    precisions = ["fp32", "fp16"] if fp16 else ["fp32"]
    manifest_files: dict[str, dict[str, Any]] = {}
    parity: dict[str, Any] = {}
    f = cfg.downsample
    # Example inputs with every dynamic axis > 1: torch.export specialises axes of size 0 or 1.
    example_images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(2, 2 * f, 3 * f, 3), dtype=np.uint8))
    example_tokens = torch.zeros(2, 2, 3, dtype=torch.int32)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=model_dir) as tmp:
        staged: dict[str, dict[str, Path]] = {}
        for precision in precisions:
            half = precision == "fp16"
            names = GRAPH_FILES[precision]
            paths = {role: Path(tmp) / name for role, name in names.items()}
            log.info("exporting %s graphs (opset %d)", precision, opset)
            _export_graph(EncoderGraph(tok, half, search_chunk), example_images, paths["encoder"], "images", "tokens", f, opset)
            _export_graph(DecoderGraph(tok, half, search_chunk), example_tokens, paths["decoder"], "tokens", "images", 1, opset)
            figures = check_parity(tok, paths, precision, image_sets)
            bad = _parity_failures(figures, PARITY[precision])
            if bad:
                raise ExportError(
                    f"{precision} parity check failed; nothing was written:\n  " + "\n  ".join(bad) + f"\nfigures: {json.dumps(figures)}"
                )
            parity[precision] = {"bounds": asdict(PARITY[precision]), "figures": figures}
            staged[precision] = paths
        for stale in GRAPH_FILES["fp16"].values() if not fp16 else ():
            (model_dir / stale).unlink(missing_ok=True)  # an earlier --fp16 export's graphs would be unlisted
        for precision, paths in staged.items():
            for role, src in paths.items():
                name = GRAPH_FILES[precision][role]
                os.replace(src, model_dir / name)
                manifest_files[name] = {"sha256": sha256_file(model_dir / name), "bytes": (model_dir / name).stat().st_size}
    for name in ("config.json", "model.safetensors"):
        manifest_files[name] = {"sha256": sha256_file(model_dir / name), "bytes": (model_dir / name).stat().st_size}
    manifest = build_manifest(cfg, manifest_files, precisions, opset, parity, real_images=len(real) > 0, revision=revision)
    tmp_manifest = model_dir / f".{MANIFEST_FILE}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_manifest, model_dir / MANIFEST_FILE)
    return manifest


def build_manifest(
    cfg: TokenizerConfig,
    files: dict[str, dict[str, Any]],
    precisions: list[str],
    opset: int,
    parity: dict[str, Any],
    real_images: bool,
    revision: str,
) -> dict[str, Any]:
    import onnx

    f = cfg.downsample
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "model": {
            "preset": cfg.preset,
            "quantizer": cfg.quantizer,
            "codebook_size": cfg.codebook_size,
            "downsample": f,
            "resolution": cfg.resolution,
            "latent_dim": cfg.latent_dim,
            "bits_per_token": cfg.bits_per_token,
        },
        "graphs": {p: GRAPH_FILES[p] for p in precisions},
        "precisions": precisions,
        "files": files,
        "opset": opset,
        "inputs": {
            "encoder": {
                "name": "images",
                "dtype": "uint8",
                "shape": ["batch", "height", "width", 3],
                "layout": "NHWC RGB",
                "range": [0, 255],
            },
            "decoder": {"name": "tokens", "dtype": "int32", "shape": ["batch", "height/f", "width/f"], "range": [0, cfg.codebook_size - 1]},
        },
        "outputs": {
            "encoder": {"name": "tokens", "dtype": "int32", "shape": ["batch", "height/f", "width/f"]},
            "decoder": {"name": "images", "dtype": "uint8", "shape": ["batch", "height", "width", 3]},
        },
        "grid": {"downsample": f, "rule": f"tokens (h, w) = (H/{f}, W/{f}); H and W must be positive multiples of {f}"},
        "parity": {**parity, "real_images_checked": real_images},
        "revision": revision,
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
    }
