"""Vector quantization with the rotation trick or straight-through gradients, and SimVQ."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import code_counts, l2norm, nearest_code, rotation_trick, straight_through
from .output import QuantizerOutput

Gradient = Literal["rotation", "ste"]


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer over a codebook of `codebook_size` codes of `dim` channels.

    - ``gradient="rotation"``: rotation trick (arXiv 2410.06424 §4.2); ``"ste"``: straight-through.
    - ``linear_codebook=True``: SimVQ (arXiv 2411.02038 §3): a frozen random basis C (K×D) and a
      learned linear map W; the effective codebook is C·W, and decoding goes through W too.
    - ``cosine=True``: codes and latents are l2-normalised before the search (cosine similarity).
    Loss = codebook_loss + beta · commitment_loss = ‖sg(e) − q‖² + β‖e − sg(q)‖².
    """

    basis: Tensor

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        gradient: Gradient = "rotation",
        linear_codebook: bool = False,
        cosine: bool = False,
        beta: float = 0.25,
        search_max_elements: int = 1 << 24,
    ) -> None:
        super().__init__()
        if gradient not in ("rotation", "ste"):
            raise ValueError(f"gradient must be 'rotation' or 'ste', got {gradient!r}")
        if dim < 1 or codebook_size < 2:
            raise ValueError(f"need dim >= 1 and codebook_size >= 2, got {dim}, {codebook_size}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.gradient: Gradient = gradient
        self.linear_codebook = linear_codebook
        self.cosine = cosine
        self.beta = beta
        self.search_max_elements = search_max_elements
        if linear_codebook:
            # SimVQ: C is drawn once and frozen (a buffer, so no optimizer can touch it);
            # W is the only codebook parameter. Official init: C ~ N(0, D^-1).
            self.register_buffer("basis", torch.randn(codebook_size, dim) * dim**-0.5)
            self.proj = nn.Linear(dim, dim, bias=False)
        else:
            # taming-transformers' init, the common VQ-VAE baseline.
            self.embedding = nn.Parameter(torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size))

    def codebook(self) -> Tensor:
        """The effective (K, D) codebook: C·W for SimVQ, the embedding otherwise (normalised if cosine)."""
        codes = self.proj(self.basis) if self.linear_codebook else self.embedding
        return l2norm(codes) if self.cosine else codes

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(B, H, W) int indices -> (B, D, H, W) codes, through W for SimVQ."""
        codes = F.embedding(indices.long(), self.codebook())  # (B, H, W, D)
        return codes.permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (B, D, H, W) latents -> QuantizerOutput with quantized (B, D, H, W) and indices (B, H, W)."""
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"expected latents (B, {self.dim}, H, W), got {tuple(z.shape)}")
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            e = z.float().permute(0, 2, 3, 1).reshape(-1, self.dim)  # (N, D)
            if self.cosine:
                e = l2norm(e)
            codebook = self.codebook().float()  # (K, D)
            indices = nearest_code(e, codebook, self.search_max_elements)  # (N,)
            q = F.embedding(indices, codebook)  # (N, D), carries gradient to the codebook
            codebook_loss = F.mse_loss(q, e.detach())
            commitment_loss = F.mse_loss(e, q.detach())
            loss = codebook_loss + self.beta * commitment_loss
            if self.gradient == "rotation":
                out = rotation_trick(e, q.detach())
            else:
                out = straight_through(e, q.detach())
        quantized = out.reshape(b, h, w, self.dim).permute(0, 3, 1, 2).contiguous()
        idx = indices.reshape(b, h, w)
        return QuantizerOutput(
            quantized=quantized,
            indices=idx,
            loss=loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            counts=code_counts(idx, self.codebook_size),
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, gradient={self.gradient!r}, "
            f"linear_codebook={self.linear_codebook}, cosine={self.cosine}, beta={self.beta}"
        )
