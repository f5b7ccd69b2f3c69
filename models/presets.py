"""Registry of named tokenizer configurations: one factory for training, export and tests.

Each preset is a `TokenizerConfig`, written as a network family (a validated config whose quantizer
fields are the defaults) with its quantizer fields replaced; `dataclasses.replace` builds (and
validates) a new config, and the type checker checks every field it sets.
"""

from __future__ import annotations

from dataclasses import replace

from .config import TokenizerConfig
from .tokenizer import Tokenizer

# --- network families ---
# CIFAR-size (32×32, f=4, an 8×8 grid): small, fast quantizer experiments.
_CIFAR = TokenizerConfig(resolution=32, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention=False)
# 256-px photos (VQGAN-family networks; sized so a shipped model stays small).
_F8 = TokenizerConfig(resolution=256, base_channels=48, norm_groups=16, channel_mult=(1, 1, 2, 2), num_res_blocks=2, attention=True)
_F16 = replace(_F8, channel_mult=(1, 1, 2, 2, 4))


def _vq(family: TokenizerConfig, codebook_size: int, *, linear_codebook: bool) -> TokenizerConfig:
    """VQ with the rotation trick; SimVQ when `linear_codebook`."""
    return replace(family, quantizer="vq", codebook_size=codebook_size, latent_dim=32, gradient="rotation", linear_codebook=linear_codebook)


def _fsq(family: TokenizerConfig, levels: tuple[int, ...]) -> TokenizerConfig:
    """FSQ: codebook_size (∏ levels) and latent_dim (len(levels)) are derived from the levels."""
    return replace(family, quantizer="fsq", fsq_levels=levels, codebook_size=0, latent_dim=0, linear_codebook=False)


_PRESETS: dict[str, TokenizerConfig] = {
    "cifar-vq-rotation": _vq(_CIFAR, 1024, linear_codebook=False),
    "cifar-simvq": _vq(_CIFAR, 1024, linear_codebook=True),
    "cifar-fsq": _fsq(_CIFAR, (8, 5, 5, 5)),  # 1,000 codes: the FSQ paper's level set nearest K = 1,024
    "f8-simvq-16k": _vq(_F8, 16384, linear_codebook=True),
    "f16-simvq-64k": _vq(_F16, 65536, linear_codebook=True),
    "f16-simvq-16k": _vq(_F16, 16384, linear_codebook=True),  # 256 tokens at 256², 14 bits each: 0.055 bpp
    "f8-fsq-64k": _fsq(_F8, (8, 8, 8, 5, 5, 5)),  # 64,000 codes (≈ 16 bits a token)
    "f16-fsq-64k": _fsq(_F16, (8, 8, 8, 5, 5, 5)),
    "f16-fsq-1k": _fsq(_F16, (8, 5, 5, 5)),  # 1,000 codes
}


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def preset_config(name: str, **overrides: object) -> TokenizerConfig:
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    return _PRESETS[name].replace(preset=name, **overrides)


def create_tokenizer(name: str, **overrides: object) -> Tokenizer:
    """Registry name (plus optional config overrides) -> randomly initialised Tokenizer."""
    return Tokenizer(preset_config(name, **overrides))
