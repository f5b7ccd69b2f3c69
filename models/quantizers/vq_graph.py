"""`VectorQuantizer` frozen for inference graphs (ONNX export, compiled runtimes).

The effective codebook C·W is folded into one constant, so a graph needs no SimVQ parameters.
The nearest-code search is ‖c‖² − 2 z·cᵀ (‖z‖² is the same for every code and dropped) with an
argmin, over blocks of `search_chunk` codes with a running minimum: the graph holds N×chunk
scores at a time instead of N×K, and ties keep the lower index exactly as `torch.argmin` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vq import VectorQuantizer

SEARCH_CHUNK = 4096  # codes per distance block


class VQGraph(nn.Module):
    codebook: Tensor
    codebook_sq: Tensor

    def __init__(self, quantizer: VectorQuantizer, search_chunk: int = SEARCH_CHUNK, fused: bool = False) -> None:
        """`fused`: search with the fused Triton kernel (`vqtok::nearest_code`, CUDA graphs only:
        compiled runtimes) instead of the chunked matmul + min (portable: ONNX)."""
        super().__init__()
        self.fused = fused
        codebook = quantizer.codebook().detach().float().clone()  # (K, D): C·W folded into one constant
        self.register_buffer("codebook", codebook)
        self.register_buffer("codebook_sq", codebook.pow(2).sum(-1))
        self.cosine = quantizer.cosine
        self.search_chunk = search_chunk

    def indices(self, z: Tensor) -> Tensor:
        """(B, D, h, w) float32 latents -> (B, h, w) int32 ids."""
        b, d, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(b, h * w, d)
        if self.cosine:
            zf = F.normalize(zf, dim=-1)
        if self.fused:
            ids = torch.ops.vqtok.nearest_code(zf.reshape(b * h * w, d).contiguous(), self.codebook, self.codebook_sq)
            return ids.to(torch.int32).reshape(b, h, w)
        best_val: Tensor | None = None
        best_idx: Tensor | None = None
        k = self.codebook.shape[0]
        for start in range(0, k, self.search_chunk):  # static: K is a constant of the graph
            cb = self.codebook[start : start + self.search_chunk]
            scores = self.codebook_sq[start : start + self.search_chunk] - 2.0 * (zf @ cb.t())  # (B, N, Kc)
            val, idx = scores.min(dim=-1)
            idx = idx + start
            if best_val is None or best_idx is None:
                best_val, best_idx = val, idx
            else:
                better = val < best_val  # strict: ties keep the lower index, like argmin
                best_val = torch.where(better, val, best_val)
                best_idx = torch.where(better, idx, best_idx)
        if best_idx is None:
            raise ValueError("empty codebook")
        return best_idx.to(torch.int32).reshape(b, h, w)

    def codes(self, tokens: Tensor) -> Tensor:
        """(B, h, w) int ids -> (B, D, h, w) float32 codes."""
        return F.embedding(tokens.to(torch.int64), self.codebook).permute(0, 3, 1, 2)
