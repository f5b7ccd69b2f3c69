"""`FSQ` frozen for inference graphs (ONNX export, compiled runtimes): the bound, the rounding and
the index arithmetic of `fsq.py` as graph constants, in float32."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .fsq import FSQ, fsq_bound_constants


class FSQGraph(nn.Module):
    levels: Tensor
    half_l: Tensor
    offset: Tensor
    shift: Tensor
    half_width: Tensor
    basis: Tensor

    def __init__(self, quantizer: FSQ) -> None:
        super().__init__()
        levels = quantizer.levels.detach().clone()
        half_l, offset, shift = fsq_bound_constants(levels)
        self.register_buffer("levels", levels)
        self.register_buffer("half_l", half_l)
        self.register_buffer("offset", offset)
        self.register_buffer("shift", shift)
        self.register_buffer("half_width", quantizer.half_width.detach().clone())
        self.register_buffer("basis", quantizer.basis.detach().clone().float())

    def indices(self, z: Tensor) -> Tensor:
        """(B, D, h, w) float32 latents -> (B, h, w) int32 ids."""
        b, d, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(b, h * w, d)
        bounded = torch.tanh(zf + self.shift) * self.half_l - self.offset
        digits = torch.round(bounded) + self.half_width
        ids = (digits * self.basis).sum(-1)
        return torch.round(ids).to(torch.int32).reshape(b, h, w)

    def codes(self, tokens: Tensor) -> Tensor:
        """(B, h, w) int ids -> (B, D, h, w) float32 codes."""
        ids = tokens.to(torch.int64)
        digits = torch.remainder(
            torch.div(ids.unsqueeze(-1), self.basis.to(torch.int64), rounding_mode="floor"), self.levels.to(torch.int64)
        )
        codes = (digits.to(torch.float32) - self.half_width) / self.half_width
        return codes.permute(0, 3, 1, 2)
