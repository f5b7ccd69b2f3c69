"""vqtok image tokenizers: quantizers, encoder/decoder networks, Tokenizer, presets, checkpoints.

Re-exports are resolved lazily so that torch-free parts of vqtok (the CLI's argument parsing,
the service) can import `models.core` and `models.export.cli` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ConfigError, TokenizerConfig
    from .presets import create_tokenizer, list_presets, preset_config
    from .tokenizer import CheckpointError, Tokenizer, TokenizerOutput

_EXPORTS = {
    "ConfigError": "config",
    "TokenizerConfig": "config",
    "create_tokenizer": "presets",
    "list_presets": "presets",
    "preset_config": "presets",
    "CheckpointError": "tokenizer",
    "Tokenizer": "tokenizer",
    "TokenizerOutput": "tokenizer",
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Tokenizer",
    "TokenizerConfig",
    "TokenizerOutput",
    "create_tokenizer",
    "list_presets",
    "preset_config",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
