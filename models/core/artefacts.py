"""The model directory: what `vqtok export` writes and every runtime, command and client reads.

A model directory holds `config.json` and `model.safetensors` (the torch model), and after export
the ONNX graphs and `manifest.json` (file hashes, opset, input spec, token grid rule, codebook
size, revision). Reading it needs no torch: this module is the single definition of the format.
Loading verifies the hashes before a runtime touches a file, so a truncated or swapped file is a
clear `ModelLoadError`, never a crash inside a runtime.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ModelLoadError, ModelNotFound

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
MANIFEST_FORMAT = "vqtok-onnx"
MANIFEST_VERSION = 1  # written by this vqtok; read: up to this one
GRAPH_FILES: dict[str, dict[str, str]] = {
    "fp32": {"encoder": "encoder.onnx", "decoder": "decoder.onnx"},
    "fp16": {"encoder": "encoder.fp16.onnx", "decoder": "decoder.fp16.onnx"},
}
DEFAULT_MODEL = "photo-f8-simvq-16k"  # what `vqtok serve` and `vqtok tokenize` use when told nothing

Device = Literal["auto", "cuda", "cpu"]
Precision = Literal["auto", "fp32", "fp16"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """The manifest's entry for one file: its hash and size."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


# --- where models live ---


def pretrained_repo() -> Path:
    """The model repository shipped inside the `models` package (`models/pretrained/`)."""
    return Path(__file__).resolve().parents[1] / "pretrained"


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST_FILE).is_file() or (path / CONFIG_FILE).is_file())


def shipped_models() -> list[str]:
    repo = pretrained_repo()
    return sorted(p.name for p in repo.iterdir() if is_model_dir(p)) if repo.is_dir() else []


def resolve_model_dir(name_or_path: str | Path | None) -> Path:
    """The one name → directory rule: an existing directory is itself; a bare NAME is a model shipped
    in `models/pretrained/`; None is the default model. Raises ModelNotFound naming what exists."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    path = Path(name_or_path)
    if path.is_dir():
        return path
    text = str(name_or_path)
    candidate = pretrained_repo() / text
    if "/" not in text and "\\" not in text and candidate.is_dir():
        return candidate
    known = ", ".join(shipped_models()) or "none"
    if path.exists():
        raise ModelNotFound(f"{text} is a file, not a model directory (shipped models: {known})")
    raise ModelNotFound(f"{text}: no such directory, and no shipped model of that name (shipped: {known})")


# --- the manifest ---


def read_manifest(model_dir: Path) -> tuple[dict[str, Any], str]:
    """(manifest, sha256 of manifest.json); ModelLoadError with the fix when there is none."""
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        if (model_dir / CONFIG_FILE).is_file():
            raise ModelLoadError(f"{model_dir} has no ONNX export (manifest.json is missing): run `vqtok export --model {model_dir}`")
        raise ModelLoadError(f"{model_dir} is not a vqtok model directory (no manifest.json or config.json)")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is corrupt (not JSON): {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ModelLoadError(f"{path} is not a vqtok ONNX manifest")
    if int(manifest.get("format_version", 0)) > MANIFEST_VERSION:
        raise ModelLoadError(f"{path} has format_version {manifest['format_version']}; this vqtok reads up to {MANIFEST_VERSION}")
    return manifest, hashlib.sha256(raw).hexdigest()


def verify_files(model_dir: Path, manifest: Mapping[str, Any], names: Sequence[str]) -> None:
    """Every named file exists and matches the manifest's SHA-256."""
    files = manifest.get("files", {})
    for name in names:
        entry = files.get(name) if isinstance(files, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise ModelLoadError(
                f"{model_dir / MANIFEST_FILE} does not list {name} with its sha256; re-run `vqtok export --model {model_dir}`"
            )
        path = model_dir / name
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing (listed in manifest.json); re-run `vqtok export --model {model_dir}`")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ModelLoadError(
                f"{path} does not match manifest.json (sha256 {digest[:12]}… != {entry['sha256'][:12]}…): "
                f"the file is corrupt or was replaced; re-run `vqtok export --model {model_dir}`"
            )


def resolve_precision(manifest: Mapping[str, Any], requested: str, on_cuda: bool, model_dir: Path) -> str:
    """The precision rule: "auto" is fp16 on CUDA where fp16 graphs were exported, else fp32; an
    explicit precision must have been exported."""
    exported = list(manifest.get("precisions", ["fp32"]))
    if requested not in ("auto", "fp32", "fp16"):
        raise ModelLoadError(f"precision must be auto, fp32 or fp16, got {requested!r}")
    precision = ("fp16" if on_cuda and "fp16" in exported else "fp32") if requested == "auto" else requested
    if precision not in exported:
        raise ModelLoadError(f"{model_dir} has no {precision} graphs (exported: {exported}); run `vqtok export --model {model_dir} --fp16`")
    return precision


@dataclass(frozen=True)
class ModelInfo:
    """What a runtime serves, read from the manifest."""

    name: str
    codebook_size: int
    downsample: int  # f: token grid is (H/f, W/f); H and W must be multiples of f
    resolution: int  # native training size (the "crop" resize mode uses it)
    quantizer: str  # "vq" or "fsq"
    precision: str  # "fp32" or "fp16": the graphs this runtime runs
    opset: int
    revision: str  # git revision that exported it
    manifest_sha256: str  # hash of manifest.json: identifies the exact artefacts


@dataclass(frozen=True)
class ExportedModel:
    """A verified view of an exported model directory: its manifest, the graphs of one precision, and
    the `ModelInfo` a runtime reports. `open_exported` checks everything a runtime relies on."""

    path: Path
    manifest: dict[str, Any]
    info: ModelInfo
    graphs: dict[str, Path]  # "encoder" / "decoder" -> file


def open_exported(
    model_dir: str | Path, *, precision: str = "auto", on_cuda: bool = False, name: str | None = None, verify: bool = True
) -> ExportedModel:
    """Read and check `model_dir`'s manifest, resolve the precision, verify the graphs' hashes."""
    model_dir = Path(model_dir)
    manifest, manifest_sha = read_manifest(model_dir)
    chosen = resolve_precision(manifest, precision, on_cuda, model_dir)
    try:
        graphs = manifest["graphs"][chosen]
        m = manifest["model"]
        info = ModelInfo(
            name=name or model_dir.name,
            codebook_size=int(m["codebook_size"]),
            downsample=int(m["downsample"]),
            resolution=int(m["resolution"]),
            quantizer=str(m["quantizer"]),
            precision=chosen,
            opset=int(manifest.get("opset", 0)),
            revision=str(manifest.get("revision", "unknown")),
            manifest_sha256=manifest_sha,
        )
        paths = {"encoder": model_dir / graphs["encoder"], "decoder": model_dir / graphs["decoder"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(
            f"{model_dir / MANIFEST_FILE} is incomplete or malformed ({exc!r}); re-run `vqtok export --model {model_dir}`"
        ) from exc
    if verify:
        verify_files(model_dir, manifest, [graphs["encoder"], graphs["decoder"]])
    return ExportedModel(model_dir, manifest, info, paths)
