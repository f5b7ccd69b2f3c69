"""Finite scalar quantization (Mentzer et al. 2023, arXiv 2309.15505)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .functional import code_counts, round_ste
from .output import QuantizerOutput

# ε of the reference implementation's bound: keeps the extreme levels reachable after tanh.
FSQ_EPS = 1e-3


def fsq_bound_constants(levels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(half_l, offset, shift): half_l = (L−1)(1+ε)/2, offset = 0.5 for even L else 0,
    shift = atanh(offset/half_l). Shared by the torch quantizer and the ONNX graph."""
    half_l = (levels - 1) * (1 + FSQ_EPS) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    return half_l, offset, torch.atanh(offset / half_l)


def fsq_bound(z: Tensor, levels: Tensor) -> Tensor:
    """bound(z) = tanh(z + shift)·half_l − offset (arXiv 2309.15505, App. A.1 reference code).
    z: (..., d), levels: (d,) float."""
    half_l, offset, shift = fsq_bound_constants(levels)
    return torch.tanh(z + shift) * half_l - offset


class FSQ(nn.Module):
    """FSQ over ``len(levels)`` channels; codebook_size = ∏ levels.

    Codes lie on the grid {(k − L//2) / (L//2)}; index = Σ digitᵢ·basisᵢ with
    basis = cumprod([1] + levels[:-1]) (the first channel is the least significant digit).
    """

    levels: Tensor
    half_width: Tensor
    basis: Tensor

    def __init__(self, levels: Sequence[int]) -> None:
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or any(level < 2 for level in levels):
            raise ValueError(f"FSQ levels must be a non-empty list of integers >= 2, got {levels}")
        self.levels_list = levels
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        basis = [1]
        for level in levels[:-1]:
            basis.append(basis[-1] * level)
        # Derived constants: non-persistent, rebuilt from the config.
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32), persistent=False)
        self.register_buffer("half_width", torch.tensor([lv // 2 for lv in levels], dtype=torch.float32), persistent=False)
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.int64), persistent=False)

    def quantize(self, z: Tensor) -> Tensor:
        """(..., d) float -> (..., d) codes on the grid, straight-through through the rounding."""
        return round_ste(fsq_bound(z, self.levels)) / self.half_width

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """(..., d) codes -> (...) int64 indices."""
        digits = torch.round(codes * self.half_width + self.half_width).long()
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(B, H, W) indices -> (B, d, H, W) codes."""
        digits = (indices.long().unsqueeze(-1) // self.basis) % self.levels.long()
        codes = (digits.float() - self.half_width) / self.half_width
        return codes.permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (B, d, H, W) -> QuantizerOutput; quantization runs in float32 even under autocast."""
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"expected latents (B, {self.dim}, H, W), got {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            e = z.float().permute(0, 2, 3, 1)  # (B, H, W, d)
            codes = self.quantize(e)
            indices = self.codes_to_indices(codes.detach())
        zero = z.new_zeros((), dtype=torch.float32)
        return QuantizerOutput(
            quantized=codes.permute(0, 3, 1, 2).contiguous(),
            indices=indices,
            loss=zero,
            codebook_loss=zero,
            commitment_loss=zero,
            counts=code_counts(indices, self.codebook_size),
        )

    def extra_repr(self) -> str:
        return f"levels={self.levels_list}, codebook_size={self.codebook_size}"
