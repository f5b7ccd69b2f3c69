"""The inference graphs `vqtok export` writes, as torch modules:

- encoder: images uint8 (B, H, W, 3) -> tokens int32 (B, H/f, W/f). Normalisation to [−1, 1] and
  the quantizer (`VQGraph` / `FSQGraph`, beside the quantizers they mirror) are inside the graph.
- decoder: tokens int32 (B, h, w) -> images uint8 (B, h·f, w·f, 3), clamp and round inside.

fp16 (and, for compiled runtimes, bf16) variants run the networks in that precision and keep the
quantizer in float32 (distances in half precision would flip near-tied codes).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..quantizers import FSQ
from ..quantizers.fsq_graph import FSQGraph
from ..quantizers.vq_graph import SEARCH_CHUNK, VQGraph
from ..tokenizer import Tokenizer, uint8_from_unit, unit_from_uint8


def images_to_input(images: Tensor) -> Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [−1, 1]."""
    return unit_from_uint8(images.permute(0, 3, 1, 2))


def output_to_images(y: Tensor) -> Tensor:
    """float (B, 3, H, W), nominally [−1, 1] -> uint8 (B, H, W, 3), clamped and rounded."""
    return uint8_from_unit(y).permute(0, 2, 3, 1)


def quantizer_graph(tok: Tokenizer, search_chunk: int = SEARCH_CHUNK, fused: bool = False) -> VQGraph | FSQGraph:
    q = tok.quantizer
    return FSQGraph(q) if isinstance(q, FSQ) else VQGraph(q, search_chunk, fused)


def network_dtype(half: bool | torch.dtype) -> torch.dtype:
    """`half`: True = float16 (the ONNX fp16 graphs), False = float32, or a dtype."""
    if isinstance(half, torch.dtype):
        return half
    return torch.float16 if half else torch.float32


class EncoderGraph(nn.Module):
    """`half`: the network's precision; `fused`: the fused Triton code search (compiled runtimes)."""

    def __init__(self, tok: Tokenizer, half: bool | torch.dtype, search_chunk: int = SEARCH_CHUNK, fused: bool = False) -> None:
        super().__init__()
        self.dtype = network_dtype(half)
        self.encoder = copy.deepcopy(tok.encoder).to(self.dtype)
        self.quant = quantizer_graph(tok, search_chunk, fused)

    def forward(self, images: Tensor) -> Tensor:
        x = images_to_input(images)  # (B, 3, H, W) in channels-last memory order: NHWC input, permuted
        z = self.encoder(x.to(self.dtype)).float()
        return self.quant.indices(z)


class DecoderGraph(nn.Module):
    def __init__(self, tok: Tokenizer, half: bool | torch.dtype, search_chunk: int = SEARCH_CHUNK) -> None:
        super().__init__()
        self.dtype = network_dtype(half)
        self.decoder = copy.deepcopy(tok.decoder).to(self.dtype)
        self.quant = quantizer_graph(tok, search_chunk)

    def forward(self, tokens: Tensor) -> Tensor:
        codes = self.quant.codes(tokens)
        y = self.decoder(codes.to(self.dtype)).float()
        return output_to_images(y)
