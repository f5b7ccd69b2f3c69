"""vqtok image tokenizers: quantizers, encoder/decoder networks, Tokenizer, presets, checkpoints, export,
and the runtimes that run exported models.

`from models import Tokenizer, TokenizerConfig, create_tokenizer, list_presets` is the contract's spelling
(DESIGN.md); those names resolve on first use, because this package also holds the torch-free core
(`models.core`, `models.runtime`) that the serving install imports without torch. Everything else is
imported from the module that defines it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import TokenizerConfig
    from .presets import create_tokenizer, list_presets
    from .tokenizer import Tokenizer

_LAZY = {"Tokenizer": ".tokenizer", "TokenizerConfig": ".config", "create_tokenizer": ".presets", "list_presets": ".presets"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
