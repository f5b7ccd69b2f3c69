"""vqtok: image tokenizers (VQ with the rotation trick, SimVQ, FSQ) for multimodal LLM pipelines.

One import namespace for the public API of the four packages (models, training, service, clients):

    import vqtok

    tok = vqtok.Tokenizer.from_pretrained("photo-f8-simvq-16k-v2") # torch: a shipped NAME, a directory, ORG/NAME on the hub
    with vqtok.LocalBackend("photo-f8-simvq-16k-v2") as backend:   # ONNX Runtime in-process, no torch, no server
        grids = backend.encode(["a.jpg"], resize="crop")
    with vqtok.Client("http://localhost:8000") as client:          # a running `vqtok serve`
        grids = client.encode(["a.jpg"])

Every name resolves lazily, on first use: `import vqtok` imports neither torch nor httpx, so a
serving or client install (no torch) and the command line pay only for what they touch. This is the one
re-export table of the project: the packages themselves re-export nothing (except `models`' four
contract names, which its torch-free core obliges it to resolve lazily too).
`python -m vqtok ...` is the `vqtok` command line (also under `torchrun ... -m vqtok train`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# where each public name is defined (tests/test_namespace.py checks the TYPE_CHECKING block below lists the same)
_MODULES: dict[str, tuple[str, ...]] = {
    "models.config": ("ConfigError", "TokenizerConfig"),
    "models.presets": ("create_tokenizer", "list_presets", "preset_config"),
    "models.tokenizer": ("CheckpointError", "Tokenizer", "TokenizerOutput"),
    "models.core.artefacts": ("DEFAULT_MODEL", "resolve_model_dir", "shipped_models"),
    "models.core.errors": ("ModelLoadError", "ModelNotFound"),
    "models.core.layouts": ("Layout", "SequenceError"),
    "models.core.vocab": ("extend_tokenizer", "read_layout"),
    "models.export.driver": ("export_model",),
    "models.export.parity": ("ExportError",),
    "clients.client": ("AsyncClient", "Client"),
    "clients.local": ("LocalBackend",),
    "clients._base": ("DecodedSequence", "ModelCard", "SpanInfo"),
    "clients._retry": ("RetryPolicy",),
    "clients.errors": (
        "APIConnectionError",
        "APIStatusError",
        "APITimeoutError",
        "AuthenticationError",
        "BadRequestError",
        "InvalidSequenceError",
        "NotAcceptableError",
        "NotFoundError",
        "OverloadedError",
        "PayloadTooLargeError",
        "RateLimitError",
        "RequestTimeoutError",
        "ServerError",
        "UnprocessableEntityError",
        "UnsupportedMediaTypeError",
        "ValidationError",
        "VqtokError",
    ),
    "clients.tokenize.encoders": ("RuntimeEncoder", "ServerEncoder"),
    "clients.tokenize.format": ("TokenizeError", "load_tokens", "read_tokens"),
    "clients.tokenize.local": ("tokenize_local",),
    "clients.tokenize.sequences": ("SequenceOptions", "read_packed"),
    "clients.tokenize.ray": ("tokenize_ray",),
}

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from clients._base import DecodedSequence, ModelCard, SpanInfo
    from clients._retry import RetryPolicy
    from clients.client import AsyncClient, Client
    from clients.errors import (
        APIConnectionError,
        APIStatusError,
        APITimeoutError,
        AuthenticationError,
        BadRequestError,
        InvalidSequenceError,
        NotAcceptableError,
        NotFoundError,
        OverloadedError,
        PayloadTooLargeError,
        RateLimitError,
        RequestTimeoutError,
        ServerError,
        UnprocessableEntityError,
        UnsupportedMediaTypeError,
        ValidationError,
        VqtokError,
    )
    from clients.local import LocalBackend
    from clients.tokenize.encoders import RuntimeEncoder, ServerEncoder
    from clients.tokenize.format import TokenizeError, load_tokens, read_tokens
    from clients.tokenize.local import tokenize_local
    from clients.tokenize.ray import tokenize_ray
    from clients.tokenize.sequences import SequenceOptions, read_packed
    from models.config import ConfigError, TokenizerConfig
    from models.core.artefacts import DEFAULT_MODEL, resolve_model_dir, shipped_models
    from models.core.errors import ModelLoadError, ModelNotFound
    from models.core.layouts import Layout, SequenceError
    from models.core.vocab import extend_tokenizer, read_layout
    from models.export.driver import export_model
    from models.export.parity import ExportError
    from models.presets import create_tokenizer, list_presets, preset_config
    from models.tokenizer import CheckpointError, Tokenizer, TokenizerOutput

    __version__: str

_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted([*_EXPORTS, "__version__"])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vqtok")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'vqtok' has no attribute {name!r}")
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
