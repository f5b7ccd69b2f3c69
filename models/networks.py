"""Encoder and decoder networks. The encoder ends in a 1×1 projection into the quantizer's
dimension and the decoder starts with a 1×1 projection out of it."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .layers import AttnBlock, Downsample, ResBlock, Upsample, group_norm


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, latent_dim, H/f, W/f), f = 2^(len(channel_mult) − 1)."""

    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        latent_dim: int,
        attention: bool,
        groups: int,
    ) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, width, groups))
                ch = width
            if level < len(widths) - 1:
                blocks.append(Downsample(ch))
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(ResBlock(ch, ch, groups), AttnBlock(ch, groups) if attention else nn.Identity(), ResBlock(ch, ch, groups))
        self.norm_out = group_norm(ch, groups)
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch, ch, 3, padding=1)
        self.proj = nn.Conv2d(ch, latent_dim, 1)  # into the quantizer's dimension

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.proj(self.conv_out(self.act(self.norm_out(h))))


class Decoder(nn.Module):
    """(B, latent_dim, h, w) -> (B, 3, h·f, w·f), unbounded (the Tokenizer clamps at inference)."""

    def __init__(
        self,
        out_channels: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        latent_dim: int,
        attention: bool,
        groups: int,
    ) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        ch = widths[-1]
        self.proj = nn.Conv2d(latent_dim, ch, 1)  # out of the quantizer's dimension
        self.conv_in = nn.Conv2d(ch, ch, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(ch, ch, groups), AttnBlock(ch, groups) if attention else nn.Identity(), ResBlock(ch, ch, groups))
        blocks: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch, widths[level], groups))
                ch = widths[level]
            if level > 0:
                blocks.append(Upsample(ch))
        self.up = nn.Sequential(*blocks)
        self.norm_out = group_norm(ch, groups)
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(self.proj(z))))
        return self.conv_out(self.act(self.norm_out(h)))
