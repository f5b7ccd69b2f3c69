"""TokenizerConfig: everything needed to rebuild a tokenizer, validated on construction."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """An invalid tokenizer configuration (bad value or invalid combination)."""


@dataclass(frozen=True)
class TokenizerConfig:
    # --- quantizer ---
    quantizer: Literal["vq", "fsq"] = "vq"
    codebook_size: int = 16384  # K for "vq"; for "fsq" it must equal ∏ fsq_levels (or be 0 to derive it)
    latent_dim: int = 32  # D: channels the quantizer sees; for "fsq" it must equal len(fsq_levels)
    gradient: Literal["rotation", "ste"] = "rotation"  # estimator through the VQ argmin
    linear_codebook: bool = True  # SimVQ: frozen C, learned W, codebook C·W
    cosine: bool = False  # l2-normalised codes and latents
    beta: float = 0.25  # commitment weight
    fsq_levels: tuple[int, ...] = ()
    # --- networks ---
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 1, 2, 2)  # one entry per resolution; f = 2^(len − 1)
    num_res_blocks: int = 2
    decoder_channels: int = 0  # the decoder's base width (0 = base_channels): a wider decoder, same tokens
    attention: bool = True  # self-attention at the lowest resolution
    norm_groups: int = 32
    # --- images ---
    resolution: int = 256  # native training size (the service's "crop" resize mode uses it)
    in_channels: int = 3
    # --- provenance ---
    preset: str = ""  # registry name it was built from, if any
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "fsq_levels", tuple(int(v) for v in self.fsq_levels))
        if self.quantizer == "fsq" and self.codebook_size == 0 and self.fsq_levels:
            object.__setattr__(self, "codebook_size", math.prod(self.fsq_levels))
        if self.quantizer == "fsq" and self.latent_dim == 0 and self.fsq_levels:
            object.__setattr__(self, "latent_dim", len(self.fsq_levels))
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"invalid TokenizerConfig: {msg}")

        if self.quantizer not in ("vq", "fsq"):
            fail(f"quantizer must be 'vq' or 'fsq', got {self.quantizer!r}")
        if self.gradient not in ("rotation", "ste"):
            fail(f"gradient must be 'rotation' or 'ste', got {self.gradient!r}")
        if self.downsample not in (4, 8, 16):
            fail(f"channel_mult {self.channel_mult} gives downsample {self.downsample}; it must be 4, 8 or 16")
        if any(m < 1 for m in self.channel_mult) or self.base_channels < 1 or self.num_res_blocks < 1 or self.norm_groups < 1:
            fail("base_channels, channel_mult entries, num_res_blocks and norm_groups must be positive")
        if self.decoder_channels < 0:
            fail(f"decoder_channels must be >= 0 (0 = base_channels), got {self.decoder_channels}")
        for width in {b * m for b in (self.base_channels, self.decoder_base_channels) for m in self.channel_mult}:
            if width % min(self.norm_groups, width):
                fail(f"channel width {width} is not divisible by norm_groups={self.norm_groups}")
        if self.resolution % self.downsample:
            fail(f"resolution {self.resolution} is not a multiple of the downsample factor {self.downsample}")
        if self.beta < 0:
            fail(f"beta must be >= 0, got {self.beta}")
        if self.quantizer == "fsq":
            if not self.fsq_levels or any(v < 2 for v in self.fsq_levels):
                fail(f"fsq needs fsq_levels, a list of integers >= 2, got {list(self.fsq_levels)}")
            if self.latent_dim != len(self.fsq_levels):
                fail(f"fsq latent_dim must equal len(fsq_levels)={len(self.fsq_levels)}, got {self.latent_dim}")
            if self.codebook_size != math.prod(self.fsq_levels):
                fail(f"fsq codebook_size must equal prod(fsq_levels)={math.prod(self.fsq_levels)}, got {self.codebook_size}")
            if self.linear_codebook or self.cosine:
                fail("linear_codebook and cosine apply to quantizer='vq' only")
        else:
            if self.fsq_levels:
                fail("fsq_levels given but quantizer is 'vq'")
            if self.codebook_size < 2:
                fail(f"codebook_size must be >= 2, got {self.codebook_size}")
            if self.codebook_size > 2**31 - 1:
                fail("codebook_size must fit in int32 token ids")
            if self.latent_dim < 1:
                fail(f"latent_dim must be >= 1, got {self.latent_dim}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.codebook_size)

    @property
    def bits_per_pixel(self) -> float:
        return self.bits_per_token / self.downsample**2

    @property
    def decoder_base_channels(self) -> int:
        return self.decoder_channels or self.base_channels

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["fsq_levels"] = list(self.fsq_levels)
        if not self.decoder_channels:  # the default is left out: configs without it read as before, by older vqtok too
            del d["decoder_channels"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"invalid TokenizerConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        if int(data.get("version", CONFIG_VERSION)) > CONFIG_VERSION:
            raise ConfigError(f"config version {data['version']} is newer than this vqtok understands ({CONFIG_VERSION})")
        try:
            return cls(**data)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:  # e.g. a list where a number belongs
            raise ConfigError(f"invalid TokenizerConfig: {exc}") from exc

    def replace(self, **changes: Any) -> TokenizerConfig:
        return TokenizerConfig.from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TokenizerConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(data)
