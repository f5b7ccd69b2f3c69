"""The taming-transformers VQGAN (Esser et al. 2021, arXiv 2012.09841) as diffusers' `VQModel` builds
it: latent-diffusion's VQ-f4/f8, aMUSEd's VQGAN, Kandinsky's MoVQ (norm_type="spatial": the decoder's
norms modulated by the codes, Zheng et al. 2022, arXiv 2209.09002 §3.2).

vqtok's own implementation, for models imported from diffusers (models/importers/): diffusers is not
needed to run it. Module names and parameter shapes are diffusers' own, so a `VQModel`'s encoder and
decoder weights load by name (`quant_conv` lives in the encoder here, `post_quant_conv` in the
decoder). Where diffusers departs from the plain design, so does this file, on purpose:
- downsampling pads right and bottom by one, then a 3×3 stride-2 convolution without padding;
- GroupNorm takes exactly `norm_groups` groups (no min()), but SpatialNorm always 32;
- the residual blocks use `act_fn`, the encoder's and decoder's output stages always SiLU;
- self-attention is single-head over all positions with linear q/k/v/out projections and a residual.
Everything exports to ONNX: no data-dependent Python control flow in forward.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import SPATIAL_NORM_GROUPS, TokenizerConfig
from .layers import Upsample  # nearest x2 then a 3x3 conv named `conv`: diffusers Upsample2D(use_conv=True) to the letter

EPS = 1e-6  # every GroupNorm of the VQModel (resnet_eps)

_ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class SpatialNorm(nn.Module):
    """GroupNorm of the features, then a per-pixel scale and shift from the codes (1×1 convolutions of
    the code grid, nearest-upsampled to the features' size)."""

    def __init__(self, channels: int, code_channels: int) -> None:
        super().__init__()
        self.norm_layer = nn.GroupNorm(SPATIAL_NORM_GROUPS, channels, eps=EPS)
        self.conv_y = nn.Conv2d(code_channels, channels, 1)
        self.conv_b = nn.Conv2d(code_channels, channels, 1)

    def forward(self, x: Tensor, codes: Tensor) -> Tensor:
        zq = F.interpolate(codes, size=x.shape[-2:], mode="nearest")
        return self.norm_layer(x) * self.conv_y(zq) + self.conv_b(zq)


def _norm(channels: int, groups: int, code_channels: int | None) -> nn.Module:
    """A bare GroupNorm or SpatialNorm: diffusers' state-dict keys name the norm itself (`norm1.weight`,
    `norm1.conv_y.weight`), so no wrapper module may sit in between."""
    if code_channels is None:
        return nn.GroupNorm(groups, channels, eps=EPS)
    return SpatialNorm(channels, code_channels)


def _apply_norm(norm: nn.Module, x: Tensor, codes: Tensor | None) -> Tensor:
    if isinstance(norm, SpatialNorm):
        if codes is None:
            raise ValueError("a spatially normalised decoder needs the codes")
        return norm(x, codes)
    return norm(x)


class ResnetBlock(nn.Module):
    """norm → act → conv → norm → act → conv, plus the input (1×1 projected when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str, code_channels: int | None = None) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups, code_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups, code_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = activation(act_fn)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, codes: Tensor | None = None) -> Tensor:
        h = self.conv1(self.nonlinearity(_apply_norm(self.norm1, x, codes)))
        h = self.conv2(self.nonlinearity(_apply_norm(self.norm2, h, codes)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class Attention(nn.Module):
    """Single-head self-attention over all positions, pre-normalised, with a residual connection.
    q is scaled before the product and the softmax runs in float32, so float16 graphs cannot overflow
    on the C-channel dot products (diffusers asks for the float32 softmax too: upcast_softmax)."""

    def __init__(self, channels: int, groups: int, code_channels: int | None = None) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS) if code_channels is None else None
        self.spatial_norm = SpatialNorm(channels, code_channels) if code_channels is not None else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' key: to_out.0
        self.scale = channels**-0.5

    def forward(self, x: Tensor, codes: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        y = _apply_norm(self.spatial_norm, x, codes) if self.spatial_norm is not None else self.group_norm(x)  # type: ignore[misc]
        tokens = y.reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q = self.to_q(tokens) * self.scale
        k, v = self.to_k(tokens), self.to_v(tokens)
        attn = (q @ k.transpose(1, 2)).float().softmax(dim=-1).to(v.dtype)  # (B, HW, HW)
        out = self.to_out[0](attn @ v)  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Pad right and bottom by one, then a 3×3 stride-2 convolution (diffusers' Downsample2D, padding=0)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class EncoderBlock(nn.Module):
    """One encoder level (DownEncoderBlock2D / AttnDownEncoderBlock2D): residual blocks, each followed by
    attention if `attention`, then a 2× downsampling unless it is the last level."""

    def __init__(
        self, in_channels: int, out_channels: int, layers: int, groups: int, act_fn: str, attention: bool, downsample: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(layers)
        )
        self.attentions = nn.ModuleList(Attention(out_channels, groups) for _ in range(layers)) if attention else None
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class DecoderBlock(nn.Module):
    """One decoder level (UpDecoderBlock2D / AttnUpDecoderBlock2D), conditioned on the codes when spatial."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        layers: int,
        groups: int,
        act_fn: str,
        attention: bool,
        upsample: bool,
        code_channels: int | None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, act_fn, code_channels) for i in range(layers)
        )
        self.attentions = nn.ModuleList(Attention(out_channels, groups, code_channels) for _ in range(layers)) if attention else None
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: Tensor, codes: Tensor | None) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, codes)
            if self.attentions is not None:
                x = self.attentions[i](x, codes)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """Residual block, attention (unless `attention` is off), residual block (UNetMidBlock2D, one layer)."""

    def __init__(self, channels: int, groups: int, act_fn: str, attention: bool, code_channels: int | None = None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups, act_fn, code_channels) for _ in range(2))
        self.attentions = nn.ModuleList([Attention(channels, groups, code_channels)] if attention else [])

    def forward(self, x: Tensor, codes: Tensor | None = None) -> Tensor:
        x = self.resnets[0](x, codes)
        for attn in self.attentions:
            x = attn(x, codes)
        return self.resnets[1](x, codes)


class TamingEncoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, latent_dim, H/f, W/f): what diffusers' `VQModel.encode(x).latents`
    returns (quant_conv included), ready for the quantizer."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        widths, groups, act = config.block_out_channels, config.norm_groups, config.act_fn
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(
                widths[max(i - 1, 0)],
                width,
                config.num_res_blocks,
                groups,
                act,
                config.encoder_attention[i],
                downsample=i < len(widths) - 1,
            )
            for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], groups, act, config.attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_act = nn.SiLU()  # SiLU whatever act_fn says, as diffusers' Encoder
        self.conv_out = nn.Conv2d(widths[-1], config.latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.latent_dim, 1)  # into the quantizer's dimension

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.quant_conv(self.conv_out(self.conv_act(self.conv_norm_out(h))))


class TamingDecoder(nn.Module):
    """(B, latent_dim, h, w) codes -> (B, 3, h·f, w·f), unbounded (the Tokenizer clamps at inference):
    what diffusers' `VQModel.decode` computes after its quantizer (post_quant_conv included). With
    norm_type="spatial" every norm is modulated by the codes themselves."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        widths, groups, act = config.block_out_channels, config.norm_groups, config.act_fn
        code_channels = config.latent_channels if config.norm_type == "spatial" else None
        self.spatial = code_channels is not None
        reversed_widths = list(reversed(widths))
        self.post_quant_conv = nn.Conv2d(config.latent_dim, config.latent_channels, 1)  # out of the quantizer's dimension
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1)
        self.mid_block = MidBlock(widths[-1], groups, act, config.attention, code_channels)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(
                reversed_widths[max(i - 1, 0)],
                width,
                config.num_res_blocks + 1,
                groups,
                act,
                config.decoder_attention[i],
                upsample=i < len(widths) - 1,
                code_channels=code_channels,
            )
            for i, width in enumerate(reversed_widths)
        )
        self.conv_norm_out = _norm(widths[0], groups, code_channels)
        self.conv_act = nn.SiLU()  # SiLU whatever act_fn says, as diffusers' Decoder
        self.conv_out = nn.Conv2d(widths[0], config.in_channels, 3, padding=1)

    def forward(self, codes: Tensor) -> Tensor:
        cond = codes if self.spatial else None
        h = self.conv_in(self.post_quant_conv(codes))
        h = self.mid_block(h, cond)
        for block in self.up_blocks:
            h = block(h, cond)
        return self.conv_out(self.conv_act(_apply_norm(self.conv_norm_out, h, cond)))


def taming_networks(config: TokenizerConfig) -> tuple[TamingEncoder, TamingDecoder]:
    if config.architecture != "taming":
        raise ValueError(f"taming_networks needs architecture='taming', got {config.architecture!r}")
    return TamingEncoder(config), TamingDecoder(config)
