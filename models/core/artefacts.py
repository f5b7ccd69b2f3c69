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
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
DEFAULT_MODEL = "photo-f8-simvq-16k-v2"  # what `vqtok serve` and `vqtok tokenize` use when told nothing

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


# Files fetched from the Hugging Face hub for a model directory: never a pickle.
HUB_FILES = ("*.json", "*.safetensors", "*.onnx", "*.md")
HUB_INSTALL = "pip install huggingface_hub (or pip install 'vqtok[hub]')"
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?", re.ASCII)


def hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `text` reads as a Hugging Face hub id, `ORG/NAME` or `ORG/NAME@REVISION`; else None."""
    match = _HUB_ID.fullmatch(text)
    if match is None or ".." in match["repo"] or "--" in match["repo"] or match["repo"].endswith((".", "-")):
        return None
    return match["repo"], match["revision"]


def model_name(model_dir: Path) -> str:
    """The name a model directory is served and reported under: its folder name, or NAME for a
    snapshot of the hub repository ORG/NAME (`…/models--ORG--NAME/snapshots/<commit>`)."""
    model_dir = Path(model_dir)
    cached = model_dir.parent.parent.name
    if model_dir.parent.name == "snapshots" and cached.startswith("models--") and cached.count("--") == 2:
        return cached.rsplit("--", 1)[1]
    return model_dir.name


def _from_hub(text: str, repo_id: str, revision: str | None, known: str) -> Path:
    """A snapshot of the hub repository in the local Hugging Face cache, downloaded if need be;
    HF_HUB_OFFLINE=1, HF_HOME, HF_HUB_CACHE and HF_TOKEN apply as everywhere in huggingface_hub."""
    not_local = f"{text}: no such directory, and no shipped model of that name (shipped: {known})"
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelNotFound(f"{not_local}; to load it as a Hugging Face hub id: {HUB_INSTALL}") from exc
    try:
        from importlib.metadata import version

        library_version = version("vqtok")
    except Exception:
        library_version = None
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=list(HUB_FILES), library_name="vqtok", library_version=library_version
        )
    except Exception as exc:  # huggingface_hub's errors differ between versions: each becomes one line
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelNotFound(f"{not_local}; as a Hugging Face hub id: {type(exc).__name__}: {reason}") from exc
    path = Path(folder)
    if not is_model_dir(path):
        raise ModelNotFound(f"{text}: the Hugging Face hub repository holds no vqtok model (no config.json or manifest.json in {path})")
    return path


def resolve_model_dir(name_or_path: str | Path | None) -> Path:
    """The one name → directory rule, used by every command, `Tokenizer.from_pretrained` and `LocalBackend`:
    1. None is the default model (`DEFAULT_MODEL`);
    2. an existing directory is itself (relative to the working directory);
    3. a bare NAME is a model shipped in `models/pretrained/`, from any working directory;
    4. ORG/NAME (optionally ORG/NAME@REVISION) is a Hugging Face hub repository, fetched into the local
       Hugging Face cache (or found there under HF_HUB_OFFLINE=1); needs `huggingface_hub`.
    Raises ModelNotFound, one line naming the shipped models, otherwise."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    path = Path(name_or_path)
    if path.is_dir():
        return path
    text = str(name_or_path)
    known = ", ".join(shipped_models()) or "none"
    if path.exists():
        raise ModelNotFound(f"{text} is a file, not a model directory (shipped models: {known})")
    candidate = pretrained_repo() / text
    if "/" not in text and "\\" not in text and candidate.is_dir():
        return candidate
    hub = hub_id(text)
    if hub is not None:
        return _from_hub(text, *hub, known)
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
    revision: str  # the artefact's own revision: the first 12 hex digits of its weights' sha256
    exported_from: str  # git revision of the code that exported it ("-dirty": from a modified checkout)
    manifest_sha256: str  # hash of manifest.json: identifies the exact artefacts
    # where an imported model came from (config.json's `source`: format, id, subfolder, commit, licence); None for vqtok's own
    source: dict[str, Any] | None = field(default=None, hash=False, compare=False)


@dataclass(frozen=True)
class ExportedModel:
    """A verified view of an exported model directory: its manifest, the graphs of one precision, and
    the `ModelInfo` a runtime reports. `open_exported` checks everything a runtime relies on."""

    path: Path
    manifest: dict[str, Any]
    info: ModelInfo
    graphs: dict[str, Path]  # "encoder" / "decoder" -> file


def config_source(model_dir: Path) -> dict[str, Any] | None:
    """config.json's `source` (an imported model's provenance), None where it has none or cannot be read."""
    try:
        source = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, dict) and source else None


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
            name=name or model_name(model_dir),
            codebook_size=int(m["codebook_size"]),
            downsample=int(m["downsample"]),
            resolution=int(m["resolution"]),
            quantizer=str(m["quantizer"]),
            precision=chosen,
            opset=int(manifest.get("opset", 0)),
            revision=str(manifest.get("files", {}).get("model.safetensors", {}).get("sha256", manifest_sha))[:12],
            exported_from=str(manifest.get("revision", "unknown")),
            manifest_sha256=manifest_sha,
            source=config_source(model_dir),
        )
        paths = {"encoder": model_dir / graphs["encoder"], "decoder": model_dir / graphs["decoder"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(
            f"{model_dir / MANIFEST_FILE} is incomplete or malformed ({exc!r}); re-run `vqtok export --model {model_dir}`"
        ) from exc
    if verify:
        verify_files(model_dir, manifest, [graphs["encoder"], graphs["decoder"]])
    return ExportedModel(model_dir, manifest, info, paths)
