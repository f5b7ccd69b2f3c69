"""TokenizerConfig: everything needed to rebuild a tokenizer, validated on construction."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_VERSION = 1

Architecture = Literal["vqtok", "taming"]
NormType = Literal["group", "spatial"]
ARCHITECTURES: tuple[str, ...] = ("vqtok", "taming")
NORM_TYPES: tuple[str, ...] = ("group", "spatial")
# the activations diffusers' residual blocks know (diffusers.models.activations.get_activation)
TAMING_ACTIVATIONS: tuple[str, ...] = ("silu", "swish", "mish", "gelu", "relu")
# diffusers' SpatialNorm normalises with 32 groups whatever norm_num_groups says
SPATIAL_NORM_GROUPS = 32
# fields of one architecture only: written to config.json for that architecture, defaults for the other
VQTOK_ONLY_FIELDS = ("base_channels", "channel_mult", "decoder_channels")
TAMING_ONLY_FIELDS = ("block_out_channels", "latent_channels", "encoder_attention", "decoder_attention", "norm_type", "act_fn")


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
    # "vqtok": models/networks.py; "taming": the taming-transformers VQGAN as diffusers' VQModel builds
    # it (models/taming.py), for imported models (models/importers/)
    architecture: Architecture = "vqtok"
    base_channels: int = 64  # vqtok only
    channel_mult: tuple[int, ...] = (1, 1, 2, 2)  # vqtok only: one entry per resolution; f = 2^(len − 1)
    num_res_blocks: int = 2  # residual blocks per encoder level, one more per decoder level (taming: layers_per_block)
    decoder_channels: int = 0  # vqtok only: the decoder's base width (0 = base_channels): a wider decoder, same tokens
    attention: bool = True  # self-attention at the lowest resolution (taming: in the mid blocks, mid_block_add_attention)
    norm_groups: int = 32  # GroupNorm groups: vqtok min(norm_groups, width); taming exactly, so every width must divide
    # --- taming only (left empty or at their defaults by architecture="vqtok") ---
    block_out_channels: tuple[int, ...] = ()  # width at each resolution, full resolution first; f = 2^(len − 1)
    latent_channels: int = 0  # channels out of the encoder and into the decoder, around the 1×1 quant_conv / post_quant_conv
    encoder_attention: tuple[bool, ...] = ()  # per encoder level: self-attention after each residual block (AttnDownEncoderBlock2D)
    decoder_attention: tuple[bool, ...] = ()  # per decoder level, lowest resolution first (AttnUpDecoderBlock2D)
    norm_type: NormType = "group"  # "spatial": decoder norms modulated by the codes (MoVQ, arXiv 2209.09002 §3.2)
    act_fn: str = "silu"  # the residual blocks' activation, one of TAMING_ACTIVATIONS
    # --- images ---
    resolution: int = 256  # native training size (the service's "crop" resize mode uses it)
    in_channels: int = 3
    # --- provenance ---
    preset: str = ""  # registry name it was built from, if any
    # where an imported model came from (models/importers): format, id, subfolder, revision, licence, versions;
    # JSON values only; left out of config.json when empty
    source: dict[str, Any] = field(default_factory=dict, hash=False)
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "fsq_levels", tuple(int(v) for v in self.fsq_levels))
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "encoder_attention", tuple(_as_bool(a) for a in self.encoder_attention))
        object.__setattr__(self, "decoder_attention", tuple(_as_bool(a) for a in self.decoder_attention))
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
        if self.architecture not in ARCHITECTURES:
            fail(f"architecture must be one of {', '.join(map(repr, ARCHITECTURES))}, got {self.architecture!r}")
        if not isinstance(self.source, dict) or not all(isinstance(k, str) for k in self.source):
            fail(f"source must be a JSON object (string keys), got {self.source!r}")
        if self.num_res_blocks < 1 or self.norm_groups < 1:
            fail("num_res_blocks and norm_groups must be positive")
        problem = self._taming_problem() if self.architecture == "taming" else self._vqtok_problem()
        if problem:
            fail(problem)
        if self.downsample not in (4, 8, 16):
            widths = "block_out_channels" if self.architecture == "taming" else "channel_mult"
            fail(f"{widths} {getattr(self, widths)} gives downsample {self.downsample}; it must be 4, 8 or 16")
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

    def _vqtok_problem(self) -> str | None:
        taming = [name for name in TAMING_ONLY_FIELDS if getattr(self, name) != _DEFAULTS[name]]
        if taming:
            return f"{_names(taming)} only to architecture='taming'"
        if any(m < 1 for m in self.channel_mult) or self.base_channels < 1:
            return "base_channels and channel_mult entries must be positive"
        if self.decoder_channels < 0:
            return f"decoder_channels must be >= 0 (0 = base_channels), got {self.decoder_channels}"
        for width in {b * m for b in (self.base_channels, self.decoder_base_channels) for m in self.channel_mult}:
            if width % min(self.norm_groups, width):
                return f"channel width {width} is not divisible by norm_groups={self.norm_groups}"
        return None

    def _taming_problem(self) -> str | None:
        """The taming network as diffusers builds it: GroupNorm(norm_groups) on every width (no
        min(), so every width must divide), SpatialNorm's own 32 groups, and a plain codebook (or a SimVQ one, retrained by `vqtok codebook retrain`)."""
        vqtok = [name for name in VQTOK_ONLY_FIELDS if getattr(self, name) != _DEFAULTS[name]]
        if vqtok:
            return f"{_names(vqtok)} only to architecture='vqtok' (a taming network's widths are block_out_channels)"
        levels = len(self.block_out_channels)
        if levels == 0 or any(c < 1 for c in self.block_out_channels):
            return f"architecture='taming' needs block_out_channels, positive widths, got {list(self.block_out_channels)}"
        if len(self.encoder_attention) != levels or len(self.decoder_attention) != levels:
            return (
                f"encoder_attention and decoder_attention need one entry per level ({levels}), "
                f"got {len(self.encoder_attention)} and {len(self.decoder_attention)}"
            )
        if self.latent_channels < 1:
            return f"latent_channels must be >= 1 for architecture='taming', got {self.latent_channels}"
        if self.norm_type not in NORM_TYPES:
            return f"norm_type must be one of {', '.join(map(repr, NORM_TYPES))}, got {self.norm_type!r}"
        if self.act_fn not in TAMING_ACTIVATIONS:
            return f"act_fn must be one of {', '.join(map(repr, TAMING_ACTIVATIONS))}, got {self.act_fn!r}"
        for width in self.block_out_channels:
            if width % self.norm_groups:
                return f"block_out_channels width {width} is not divisible by norm_groups={self.norm_groups}"
            if self.norm_type == "spatial" and width % SPATIAL_NORM_GROUPS:
                return f"block_out_channels width {width} is not divisible by {SPATIAL_NORM_GROUPS}, the groups of norm_type='spatial'"
        if self.norm_type == "spatial" and self.latent_dim != self.latent_channels:
            # the decoder's norms are built for latent_channels and fed the codes (latent_dim channels)
            return f"norm_type='spatial' needs latent_dim == latent_channels, got {self.latent_dim} and {self.latent_channels}"
        # linear_codebook=true: an imported codebook retrained as SimVQ (`vqtok codebook retrain --quantizer simvq`)
        if self.quantizer != "vq" or self.cosine:
            return "architecture='taming' quantizes with a plain or SimVQ codebook: quantizer='vq', cosine=false"
        return None

    @property
    def downsample(self) -> int:
        levels = len(self.block_out_channels) if self.architecture == "taming" else len(self.channel_mult)
        return 2 ** (levels - 1)

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
        for name in ("channel_mult", "fsq_levels", "block_out_channels", "encoder_attention", "decoder_attention"):
            d[name] = list(d[name])
        # Defaults are left out where they add nothing: vqtok configs read as before, by older vqtok too,
        # and each architecture's config.json names only the fields that describe it.
        if self.architecture == "vqtok":
            for name in ("architecture", *TAMING_ONLY_FIELDS):
                del d[name]
        else:
            for name in VQTOK_ONLY_FIELDS:
                del d[name]
        if not self.decoder_channels:
            d.pop("decoder_channels", None)
        if not self.source:
            del d["source"]
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


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TokenizerConfig) if f.default is not dataclasses.MISSING}


def _names(fields: list[str]) -> str:
    return f"{', '.join(fields)} {'applies' if len(fields) == 1 else 'apply'}"


def _as_bool(value: Any) -> bool:
    """JSON booleans only: `bool("false")` would read a quoted false as true."""
    if not isinstance(value, bool):
        raise ConfigError(f"invalid TokenizerConfig: expected true or false, got {value!r}")
    return value
