"""Kernel Inception Distance (Bińkowski et al., "Demystifying MMD GANs", ICLR 2018, arXiv 1801.01401).

KID is the squared maximum mean discrepancy between two sets of Inception pool features under the
cubic polynomial kernel k(x, y) = (x·y / d + 1)³ (paper §4, d = feature dimension), estimated with
the unbiased estimator (Gretton et al. 2012, eq. 3):

    MMD²_u = 1/(m(m−1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m−1)) Σ_{i≠j} k(y_i, y_j) − 2/m² Σ_{i,j} k(x_i, y_j)

It is averaged over random subsets of m features from each set, as in the paper's reference code
and torch-fidelity (m = 1000, 100 subsets): the mean and the (population) standard deviation over
subsets are reported. Unlike FID, the estimator is unbiased, so it can come out slightly negative
for two samples of one distribution, and it is comparable across sample sizes.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _as_float64(features: Any, name: str) -> np.ndarray:
    """A numpy or torch (N, d) array as a float64 numpy array."""
    if hasattr(features, "detach"):  # a torch tensor; torch itself is not needed here
        features = features.detach().cpu().numpy()
    out = np.asarray(features, dtype=np.float64)
    if out.ndim != 2:
        raise ValueError(f"{name} must be (N, d) features, got shape {out.shape}")
    return out


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / d + 1)³ for every pair of rows: (m, d) × (n, d) -> (m, n)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² estimate between two equal-size samples (the diagonals k(x_i, x_i) are
    left out of the within-set terms; the cross term keeps every pair)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kid(features_a: Any, features_b: Any, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID between two feature sets (N_a, d) and (N_b, d), numpy or torch: (mean, std) of the
    unbiased MMD² over ``subsets`` random subsets of m = min(subset_size, N_a, N_b) rows of each
    set, drawn without replacement (seeded: a RandomState(seed) draws a's rows, then b's, per
    subset, the order torch-fidelity uses). Reported as is; papers often quote KID × 1000."""
    a, b = _as_float64(features_a, "features_a"), _as_float64(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {a.shape[0]} and {b.shape[0]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    rng = np.random.RandomState(seed)
    estimates = np.empty(subsets)
    for s in range(subsets):
        xa = a[rng.choice(a.shape[0], m, replace=False)]
        xb = b[rng.choice(b.shape[0], m, replace=False)]
        estimates[s] = mmd2_unbiased(xa, xb)
    return float(estimates.mean()), float(estimates.std())
