"""`export_model`: a model directory (config.json + model.safetensors) -> ONNX graphs + manifest.json,
in place. Nothing is written into the model directory until every graph has passed the parity gate
(`parity.py`); the manifest (format: `models.core.artefacts`) is replaced atomically last."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import TokenizerConfig
from ..core.artefacts import CONFIG_FILE, GRAPH_FILES, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, WEIGHTS_FILE, file_record
from ..core.fileio import atomic_write
from ..core.gate import PARITY_FILE, write_parity_set
from ..quantizers.vq_graph import SEARCH_CHUNK
from ..tokenizer import Tokenizer
from .graphs import DecoderGraph, EncoderGraph
from .parity import (
    NEAR_TIE_RULE,
    PARITY,
    ExportError,
    check_gpu_parity,
    check_parity,
    find_parity_images,
    parity_failures,
    parity_image_sets,
    torch_references,
)

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
# the exporter's own chatter (hundreds of INFO lines per graph: rewrite passes, constant folding,
# "torchvision is not installed"): only its warnings that matter reach the user
_NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch._export", "torch.export")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_graph(
    module: nn.Module, example: Tensor, path: Path, input_name: str, output_name: str, spatial_multiple: int, opset: int
) -> None:
    """torch.export -> ONNX with dynamic batch, height and width (multiples of `spatial_multiple`), checked."""
    dim = torch.export.Dim
    batch = dim("batch", min=1, max=4096)
    height, width = dim("height_units", min=1, max=8192), dim("width_units", min=1, max=8192)
    dynamic = {0: batch, 1: spatial_multiple * height, 2: spatial_multiple * width}
    with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter():
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
                dynamic_shapes={input_name: dynamic},
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


def export_model(
    model_dir: str | Path,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    parity_images: str | Path | None = None,
    search_chunk: int = SEARCH_CHUNK,
    progress: bool | None = None,
    gpu: bool | None = None,
    fp16_optional: bool = False,
) -> dict[str, Any]:
    """Export `model_dir` (config.json + model.safetensors) to ONNX in place; returns the manifest.

    Raises ExportError (with the parity figures) if ORT does not reproduce torch within `PARITY`.
    Also writes the parity set (`parity.npz`: the real photos, the CPU float32 tokens and decodes)
    that GPU runtimes are gated on at load. `gpu` (None: where CUDA is available) also gates the GPU
    runtimes here, and refuses the export when none of them passes. `fp16_optional`: float16 graphs that
    miss their gate are left out (the fp32 ones kept, the reason under the manifest's `fp16_left_out`)
    instead of refusing the export.
    `progress`: a bar on stderr (None: when stderr is a terminal).
    """
    from tqdm import tqdm

    model_dir = Path(model_dir)
    revision = git_revision()  # before this export rewrites tracked files in a checkout
    tok = Tokenizer.from_pretrained(model_dir).eval().float()
    cfg = tok.config
    real = find_parity_images(parity_images)
    if not real:
        log.warning("no real images found for the parity check (--parity-images, $VQTOK_PARITY_IMAGES); checking random images only")
    references = torch_references(tok, parity_image_sets(cfg, real))  # once: every precision is gated on them
    precisions = ["fp32", "fp16"] if fp16 else ["fp32"]
    fp16_left_out: str | None = None
    manifest_files: dict[str, dict[str, Any]] = {}
    parity: dict[str, Any] = {}
    f = cfg.downsample
    # Example inputs with every dynamic axis > 1: torch.export specialises axes of size 0 or 1.
    example_images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(2, 2 * f, 3 * f, 3), dtype=np.uint8))
    example_tokens = torch.zeros(2, 2, 3, dtype=torch.int32)
    bar = tqdm(
        total=3 * len(precisions) + 1, desc=f"export {model_dir.name}", unit="step", disable=None if progress is None else not progress
    )
    with tempfile.TemporaryDirectory(prefix=".export-", dir=model_dir) as tmp:
        staged: dict[str, dict[str, Path]] = {}
        for precision in precisions:
            half = precision == "fp16"
            paths = {role: Path(tmp) / name for role, name in GRAPH_FILES[precision].items()}
            log.info("exporting %s graphs (opset %d)", precision, opset)
            bar.set_postfix_str(f"{precision} encoder")
            export_graph(EncoderGraph(tok, half, search_chunk), example_images, paths["encoder"], "images", "tokens", f, opset)
            bar.update()
            bar.set_postfix_str(f"{precision} decoder")
            export_graph(DecoderGraph(tok, half, search_chunk), example_tokens, paths["decoder"], "tokens", "images", 1, opset)
            bar.update()
            bar.set_postfix_str(f"{precision} parity")
            figures = check_parity(paths, precision, references)
            bar.update()
            bad = parity_failures(figures, PARITY[precision])
            if bad and half and fp16_optional:
                fp16_left_out = bad[0]
                log.warning("the float16 graphs miss the parity gate (%s); writing the float32 graphs only", fp16_left_out)
                continue
            if bad:
                raise ExportError(
                    f"{precision} parity check failed; nothing was written:\n  " + "\n  ".join(bad) + f"\nfigures: {json.dumps(figures)}"
                )
            parity[precision] = {"bounds": asdict(PARITY[precision]), "near_tie_rule": NEAR_TIE_RULE, "figures": figures}
            staged[precision] = paths
        r = cfg.resolution
        reference = references.get(f"real_{r}x{r}")  # the stored set: the native-size real photos
        gpu_figures: dict[str, Any] = {}
        if reference is not None and (gpu if gpu is not None else torch.cuda.is_available()):
            bar.set_postfix_str("GPU parity")
            gpu_figures = check_gpu_parity(tok, staged, reference)
        bar.update()
        bar.close()
        if reference is not None:
            write_parity_set(Path(tmp) / PARITY_FILE, reference)
        precisions = list(staged)  # without fp16 where it was optional and missed its gate
        for stale in GRAPH_FILES["fp16"].values() if "fp16" not in staged else ():
            (model_dir / stale).unlink(missing_ok=True)  # an earlier --fp16 export's graphs would be unlisted
        for precision, paths in staged.items():
            for role, src in paths.items():
                name = GRAPH_FILES[precision][role]
                os.replace(src, model_dir / name)
                manifest_files[name] = file_record(model_dir / name)
        if reference is not None:
            os.replace(Path(tmp) / PARITY_FILE, model_dir / PARITY_FILE)
            manifest_files[PARITY_FILE] = file_record(model_dir / PARITY_FILE)
        else:
            (model_dir / PARITY_FILE).unlink(missing_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        manifest_files[name] = file_record(model_dir / name)
    manifest = build_manifest(cfg, manifest_files, precisions, opset, parity, real_images=len(real) > 0, revision=revision)
    if gpu_figures:
        manifest["parity"]["gpu"] = gpu_figures
    if fp16_left_out:
        manifest["fp16_left_out"] = fp16_left_out
    atomic_write(model_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
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
