"""Registry of named tokenizer configurations: one factory for training, export and tests."""

from __future__ import annotations

from collections.abc import Callable

from .config import TokenizerConfig
from .tokenizer import Tokenizer

_PRESETS: dict[str, Callable[[], TokenizerConfig]] = {}


def register_preset(name: str) -> Callable[[Callable[[], TokenizerConfig]], Callable[[], TokenizerConfig]]:
    def wrap(fn: Callable[[], TokenizerConfig]) -> Callable[[], TokenizerConfig]:
        if name in _PRESETS:
            raise ValueError(f"preset {name!r} registered twice")
        _PRESETS[name] = fn
        return fn

    return wrap


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def preset_config(name: str, **overrides: object) -> TokenizerConfig:
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    return _PRESETS[name]().replace(preset=name, **overrides)


def create_tokenizer(name: str, **overrides: object) -> Tokenizer:
    """Registry name (plus optional config overrides) -> randomly initialised Tokenizer."""
    return Tokenizer(preset_config(name, **overrides))


# --- CIFAR-size (32×32, f=4, an 8×8 grid): small, fast quantizer experiments ---
_CIFAR = dict(resolution=32, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention=False)


@register_preset("cifar-vq-rotation")
def _cifar_vq_rotation() -> TokenizerConfig:
    return TokenizerConfig(quantizer="vq", codebook_size=1024, latent_dim=32, gradient="rotation", linear_codebook=False, **_CIFAR)  # type: ignore[arg-type]


@register_preset("cifar-simvq")
def _cifar_simvq() -> TokenizerConfig:
    return TokenizerConfig(quantizer="vq", codebook_size=1024, latent_dim=32, gradient="rotation", linear_codebook=True, **_CIFAR)  # type: ignore[arg-type]


@register_preset("cifar-fsq")
def _cifar_fsq() -> TokenizerConfig:
    # [8, 5, 5, 5]: 1,000 codes, the FSQ paper's level set nearest K = 1,024.
    return TokenizerConfig(quantizer="fsq", fsq_levels=(8, 5, 5, 5), codebook_size=0, latent_dim=0, linear_codebook=False, **_CIFAR)  # type: ignore[arg-type]


# --- 256-px photos (VQGAN-family networks; sized so a shipped model stays small) ---
_F8 = dict(resolution=256, base_channels=48, norm_groups=16, channel_mult=(1, 1, 2, 2), num_res_blocks=2, attention=True)
_F16 = dict(resolution=256, base_channels=48, norm_groups=16, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attention=True)


@register_preset("f8-simvq-16k")
def _f8_simvq_16k() -> TokenizerConfig:
    return TokenizerConfig(quantizer="vq", codebook_size=16384, latent_dim=32, gradient="rotation", linear_codebook=True, **_F8)  # type: ignore[arg-type]


@register_preset("f16-simvq-64k")
def _f16_simvq_64k() -> TokenizerConfig:
    return TokenizerConfig(quantizer="vq", codebook_size=65536, latent_dim=32, gradient="rotation", linear_codebook=True, **_F16)  # type: ignore[arg-type]


@register_preset("f8-fsq-64k")
def _f8_fsq_64k() -> TokenizerConfig:
    # [8, 8, 8, 5, 5, 5]: 64,000 codes (≈ 16 bits a token).
    return TokenizerConfig(quantizer="fsq", fsq_levels=(8, 8, 8, 5, 5, 5), codebook_size=0, latent_dim=0, linear_codebook=False, **_F8)  # type: ignore[arg-type]


@register_preset("f16-fsq-64k")
def _f16_fsq_64k() -> TokenizerConfig:
    return TokenizerConfig(quantizer="fsq", fsq_levels=(8, 8, 8, 5, 5, 5), codebook_size=0, latent_dim=0, linear_codebook=False, **_F16)  # type: ignore[arg-type]


@register_preset("f16-fsq-1k")
def _f16_fsq_1k() -> TokenizerConfig:
    # [8, 5, 5, 5]: 1,000 codes.
    return TokenizerConfig(quantizer="fsq", fsq_levels=(8, 5, 5, 5), codebook_size=0, latent_dim=0, linear_codebook=False, **_F16)  # type: ignore[arg-type]
