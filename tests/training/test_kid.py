"""KID: the unbiased MMD² with the cubic kernel, checked against the formula written out with loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.kid import kid


def _mmd2_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Bińkowski et al. 2018 / Gretton et al. 2012 eq. 3, term by term, k(a, b) = (a·b/d + 1)³."""
    m, d = x.shape

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (sum(float(a[t]) * float(b[t]) for t in range(d)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2.0 * xy


def test_matches_the_formula_on_a_tiny_case() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 5)), rng.standard_normal((7, 5)) + 0.3
    expected = _mmd2_by_loops(a, b)
    mean, std = kid(a, b, subsets=1, subset_size=7)  # one subset = the whole set (a permutation of it)
    assert mean == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert std == 0.0


def test_whole_set_subsets_all_agree_and_torch_input_matches() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((9, 4)), rng.standard_normal((12, 4))
    mean, std = kid(a, b, subsets=5, subset_size=100)  # m = min(100, 9, 12) = 9: all of a each time
    assert std >= 0.0
    t_mean, t_std = kid(torch.from_numpy(a), torch.from_numpy(b), subsets=5, subset_size=100)
    assert (t_mean, t_std) == (mean, std)
    same_a_mean, same_a_std = kid(a, b[:9], subsets=3, subset_size=9)
    assert same_a_mean == pytest.approx(_mmd2_by_loops(a, b[:9]), rel=1e-12) and same_a_std == pytest.approx(0.0, abs=1e-15)


def test_subsets_are_seeded() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((60, 8)), rng.standard_normal((50, 8))
    assert kid(a, b, subsets=10, subset_size=20, seed=3) == kid(a, b, subsets=10, subset_size=20, seed=3)
    assert kid(a, b, subsets=10, subset_size=20, seed=3) != kid(a, b, subsets=10, subset_size=20, seed=4)


def test_same_distribution_near_zero_shifted_positive() -> None:
    rng = np.random.default_rng(3)
    d = 64
    a, b = rng.standard_normal((600, d)), rng.standard_normal((600, d))
    shifted = rng.standard_normal((600, d)) + 0.25
    same_mean, same_std = kid(a, b, subsets=20, subset_size=300)
    diff_mean, diff_std = kid(a, shifted, subsets=20, subset_size=300)
    assert abs(same_mean) < 3 * same_std + 1e-3  # unbiased: centred on 0, may be slightly negative
    assert diff_mean > 10 * abs(same_mean) and diff_mean > 5 * diff_std > 0


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="dimensions differ"):
        kid(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        kid(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        kid(np.zeros(4), np.zeros((4, 1)))
