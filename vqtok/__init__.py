"""vqtok: image tokenizers (VQ with the rotation trick, SimVQ, FSQ) for multimodal LLM pipelines.

One import namespace for the public API of the four packages (models, training, service, clients):

    import vqtok

    tok = vqtok.Tokenizer.from_pretrained("photo-f8-simvq-16k-v2") # torch: a shipped NAME, a directory, ORG/NAME on the hub
    with vqtok.LocalBackend("photo-f8-simvq-16k-v2") as backend:   # ONNX Runtime in-process, no torch, no server
        grids = backend.encode(["a.jpg"], resize="crop")
    with vqtok.Client("http://localhost:8000") as client:          # a running `vqtok serve`
        grids = client.encode(["a.jpg"])

Every name resolves lazily, on first use: `import vqtok` imports neither torch nor httpx, so a
serving or client install (no torch) and the command line pay only for what they touch.
`python -m vqtok ...` is the `vqtok` command line (also under `torchrun ... -m vqtok train`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the re-exported names, for type checkers and IDEs
    from clients import (
        APIConnectionError,
        APIStatusError,
        APITimeoutError,
        AsyncClient,
        AuthenticationError,
        BadRequestError,
        Client,
        LocalBackend,
        ModelCard,
        NotFoundError,
        OverloadedError,
        PayloadTooLargeError,
        RateLimitError,
        RequestTimeoutError,
        RetryPolicy,
        ServerError,
        UnprocessableEntityError,
        UnsupportedMediaTypeError,
        ValidationError,
        VqtokError,
    )
    from clients.tokenize import RuntimeEncoder, ServerEncoder, TokenizeError, load_tokens, read_tokens, tokenize_local, tokenize_ray
    from models import (
        CheckpointError,
        ConfigError,
        Tokenizer,
        TokenizerConfig,
        TokenizerOutput,
        create_tokenizer,
        list_presets,
        preset_config,
    )
    from models.core.artefacts import DEFAULT_MODEL, resolve_model_dir, shipped_models
    from models.core.errors import ModelLoadError, ModelNotFound
    from models.export import ExportError, export_model

    __version__: str

# where each name lives: the packages' own lazy re-exports, resolved by name on first use (listed
# here rather than read from the packages' __all__, so that `import vqtok` imports no package at all)
_MODULES: dict[str, tuple[str, ...]] = {
    "models": (
        "CheckpointError",
        "ConfigError",
        "Tokenizer",
        "TokenizerConfig",
        "TokenizerOutput",
        "create_tokenizer",
        "list_presets",
        "preset_config",
    ),
    "models.core.artefacts": ("DEFAULT_MODEL", "resolve_model_dir", "shipped_models"),
    "models.core.errors": ("ModelLoadError", "ModelNotFound"),
    "models.export": ("ExportError", "export_model"),
    "clients": (
        "APIConnectionError",
        "APIStatusError",
        "APITimeoutError",
        "AsyncClient",
        "AuthenticationError",
        "BadRequestError",
        "Client",
        "LocalBackend",
        "ModelCard",
        "NotFoundError",
        "OverloadedError",
        "PayloadTooLargeError",
        "RateLimitError",
        "RequestTimeoutError",
        "RetryPolicy",
        "ServerError",
        "UnprocessableEntityError",
        "UnsupportedMediaTypeError",
        "ValidationError",
        "VqtokError",
    ),
    "clients.tokenize": (
        "RuntimeEncoder",
        "ServerEncoder",
        "TokenizeError",
        "load_tokens",
        "read_tokens",
        "tokenize_local",
        "tokenize_ray",
    ),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "DEFAULT_MODEL",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "CheckpointError",
    "Client",
    "ConfigError",
    "ExportError",
    "LocalBackend",
    "ModelCard",
    "ModelLoadError",
    "ModelNotFound",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RateLimitError",
    "RequestTimeoutError",
    "RetryPolicy",
    "RuntimeEncoder",
    "ServerEncoder",
    "ServerError",
    "TokenizeError",
    "Tokenizer",
    "TokenizerConfig",
    "TokenizerOutput",
    "UnprocessableEntityError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "VqtokError",
    "__version__",
    "create_tokenizer",
    "export_model",
    "list_presets",
    "load_tokens",
    "preset_config",
    "read_tokens",
    "resolve_model_dir",
    "shipped_models",
    "tokenize_local",
    "tokenize_ray",
]


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
    return sorted({*globals(), *__all__, *_EXPORTS})
