"""Pure maths shared by the quantizers. Every function here is stateless and ONNX-friendly
unless its docstring says otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows of ê + q̂ shorter than this are treated as antipodal (ê ≈ −q̂): the Householder
# reflection is undefined there, so those rows take the straight-through gradient instead.
ROTATION_EPS = 1e-6


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    return F.normalize(x, dim=dim, eps=eps)


def round_ste(z: Tensor) -> Tensor:
    """Round to the nearest integer with an identity (straight-through) gradient."""
    return z + (torch.round(z) - z).detach()


def straight_through(e: Tensor, q: Tensor) -> Tensor:
    """Forward value q, gradient to e is the identity (van den Oord et al. 2017)."""
    return e + (q - e).detach()


def rotation_trick(e: Tensor, q: Tensor, eps: float = ROTATION_EPS) -> Tensor:
    """Rotation trick (Fifty et al. 2024, arXiv 2410.06424, §4.2).

    e: (N, D) encoder outputs, q: (N, D) selected codes. The forward value is exactly q; the
    gradient that reaches e is λ·Rᵀ·g with λ = ‖q‖/‖e‖ and R = I − 2rrᵀ + 2q̂êᵀ,
    r = (ê+q̂)/‖ê+q̂‖, all treated as constants. Computed in float32 whatever the input dtype.
    Rows with ê + q̂ ≈ 0 (antipodal) or a zero-norm e or q fall back to the straight-through
    gradient, so no NaN or Inf can appear.
    """
    dtype = e.dtype
    e32, q32 = e.float(), q.detach().float()
    with torch.no_grad():
        e_norm = e32.norm(dim=-1, keepdim=True)
        q_norm = q32.norm(dim=-1, keepdim=True)
        e_hat = e32 / e_norm.clamp_min(1e-12)
        q_hat = q32 / q_norm.clamp_min(1e-12)
        s = e_hat + q_hat
        s_norm = s.norm(dim=-1, keepdim=True)
        r = s / s_norm.clamp_min(1e-12)
        lam = q_norm / e_norm.clamp_min(1e-12)
        ok = (s_norm > eps) & (e_norm > eps) & (q_norm > eps)
    # R e = e − 2 r (rᵀe) + 2 q̂ (êᵀe); only the explicit e carries gradient.
    rotated = e32 - 2 * r * (r * e32).sum(-1, keepdim=True) + 2 * q_hat * (e_hat * e32).sum(-1, keepdim=True)
    rotated = lam * rotated
    surrogate = torch.where(ok, rotated, e32)
    # Forward value is q to the bit: (s − sg(s)) is exactly zero.
    out = q32 + (surrogate - surrogate.detach())
    return out.to(dtype)


def code_distances(z: Tensor, codebook: Tensor, codebook_sq: Tensor | None = None) -> Tensor:
    """Squared distances up to a per-row constant: −2 z·cᵀ + ‖c‖² (‖z‖² does not change the
    argmin, so it is left out). z: (N, D), codebook: (K, D) -> (N, K)."""
    if codebook_sq is None:
        codebook_sq = codebook.pow(2).sum(-1)
    # One GEMM with the bias folded in: the N×K block is written once, not three times.
    return torch.addmm(codebook_sq.unsqueeze(0), z, codebook.t(), beta=1.0, alpha=-2.0)


def nearest_code(z: Tensor, codebook: Tensor, max_elements: int = 1 << 24) -> Tensor:
    """Index of the nearest code for every row of z (N, D) in codebook (K, D) -> int64 (N,).

    Matmul-based (‖z‖² − 2z·cᵀ + ‖c‖²), chunked over rows so that at most `max_elements`
    entries of the N×K distance matrix exist at once (K = 65,536 → 256 rows a chunk).
    Eager-mode helper: the chunk loop depends on N, so ONNX export uses its own graph.
    """
    with torch.no_grad():
        z = z.float()
        codebook = codebook.float()
        codebook_sq = codebook.pow(2).sum(-1)
        rows = max(1, max_elements // codebook.shape[0])
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for start in range(0, z.shape[0], rows):
            chunk = z[start : start + rows]
            out[start : start + rows] = code_distances(chunk, codebook, codebook_sq).argmin(dim=-1)
        return out


def code_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """Histogram of code use: int64 (K,). Sum it over batches to get whole-set usage."""
    return torch.bincount(indices.reshape(-1), minlength=codebook_size)


def usage_from_counts(counts: Tensor) -> float:
    """Fraction of codes used at least once."""
    return float((counts > 0).float().mean())


def perplexity_from_counts(counts: Tensor) -> float:
    """exp(entropy of the code frequencies); K for uniform use, 1 for a single code."""
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return float(torch.exp(entropy))


# --- argmin near-ties -----------------------------------------------------------------------------
# Two float32 implementations of the same encoder (ONNX Runtime's kernels and torch's, or diffusers'
# and ours) pick different codes where a latent z lies almost on the boundary between two codes' cells.
# Measured on VQ models with 16,384 codes in D = 4 (latent-diffusion's VQ-f8 and MoVQ shapes, codebooks
# drawn from their latents; Kodak at 256² and 192×320): of 32 ONNX-Runtime-vs-torch float32 flips, 25
# came from the latent itself (the networks' outputs differ by a median 5e-6..1e-5 of the set's RMS
# latent norm, with a tail to 1e-3) and 7 from the code search (the float32 expansion ‖e‖² − 2z·e
# rounds at the magnitude ‖z‖² + ‖e‖², not at the tiny distance left after cancellation). The flipped
# codes' distances differed by up to 0.6 % of the larger one (on the first model): a tolerance relative
# to the distance itself cannot tell these ties.
# So a mismatch of codes a, b is a near-tie when, with float64 squared distances da, db to the
# reference latent,
#     |da − db| ≤ 2·TIE_LATENT·s·‖ea − eb‖ + TIE_SEARCH·(‖z‖² + max(‖ea‖², ‖eb‖²))
# - the first term bounds what a latent perturbation of size TIE_LATENT·s does to da − db (its gradient
#   in z is 2(eb − ea)); s is the RMS latent norm over the whole set, because a network's rounding
#   error is set by the size of its activations, not by the size of one output. TIE_LATENT is the
#   typical float32 latent difference above: a tie is a latent a typical float32 difference could move
#   across the boundary. float16 networks move latents 30–60× as far (median 3e-4..7e-4 of s);
# - the second covers the search's rounding: each of the four scores compared (two per side) rounds at
#   about 2u·(‖z‖² + ‖e‖²), u = 2⁻²⁴ (the flips the search caused measured ≤ 11u).
# With these, 27 of the 32 float32 flips are ties, and 15 % of 1,053 float16 flips (the same models
# and D = 64, 256 ones): float16's disagreements stay disagreements. Worst-case D-fold error bounds
# would excuse a third of float16's; this rule is meant to excuse rounding, not a wrong graph.
TIE_LATENT = 1e-5
TIE_SEARCH = 8 * 2.0**-24


def near_tie_mask(latents: Tensor, codebook: Tensor, ids: Tensor, reference: Tensor) -> Tensor:
    """Which positions where `ids` and `reference` differ are argmin near-ties (rule above).

    latents: float (B, D, h, w), the reference's latents as its code search saw them (normalised for a
    cosine quantizer); codebook: (K, D) as searched; ids, reference: int (B, h, w). Returns bool (B, h, w),
    False wherever the ids agree."""
    differ = ids != reference
    out = torch.zeros_like(differ)
    if not bool(differ.any()):
        return out
    z_all = latents.detach().permute(0, 2, 3, 1).double()  # (B, h, w, D)
    scale = z_all.pow(2).sum(-1).mean().sqrt()  # RMS latent norm of the set
    z = z_all[differ]
    cb = codebook.detach().double().to(z.device)
    ea, eb = cb[ids[differ].long()], cb[reference[differ].long()]
    gap = ((z - ea).pow(2).sum(-1) - (z - eb).pow(2).sum(-1)).abs()
    magnitude = z.pow(2).sum(-1) + torch.maximum(ea.pow(2).sum(-1), eb.pow(2).sum(-1))
    out[differ] = gap <= 2 * TIE_LATENT * scale * (ea - eb).norm(dim=-1) + TIE_SEARCH * magnitude
    return out


def near_ties(latents: Tensor, codebook: Tensor, ids: Tensor, reference: Tensor) -> int:
    """How many of the positions where `ids` and `reference` differ are argmin near-ties (`near_tie_mask`)."""
    return int(near_tie_mask(latents, codebook, ids, reference).sum())
