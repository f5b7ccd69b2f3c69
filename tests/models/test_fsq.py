"""FSQ: grid, index round trips, gradient of the bound, and agreement with vector-quantize-pytorch."""

from __future__ import annotations

import math

import pytest
import torch
from vector_quantize_pytorch import FSQ as ReferenceFSQ

from models.quantizers import FSQ
from models.quantizers.fsq import FSQ_EPS

LEVEL_SETS = [[8, 5, 5, 5], [8, 8, 8, 5, 5, 5], [7, 5, 5, 5, 5], [3, 4]]


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_every_index_round_trips(levels: list[int]) -> None:
    fsq = FSQ(levels)
    assert fsq.codebook_size == math.prod(levels)
    idx = torch.arange(fsq.codebook_size).reshape(1, 1, -1)
    codes = fsq.indices_to_codes(idx)  # (1, d, 1, K)
    back = fsq.codes_to_indices(codes.permute(0, 2, 3, 1))
    assert torch.equal(back, idx)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_values_lie_on_the_grid(levels: list[int]) -> None:
    fsq = FSQ(levels)
    out = fsq(torch.randn(4, len(levels), 9, 9) * 4)
    half = torch.tensor([lv // 2 for lv in levels], dtype=torch.float32).reshape(1, -1, 1, 1)
    scaled = out.quantized * half
    assert torch.equal(scaled, scaled.round())
    lo = -half
    hi = torch.tensor([(lv - 1) - lv // 2 for lv in levels], dtype=torch.float32).reshape(1, -1, 1, 1)
    assert bool(((scaled >= lo) & (scaled <= hi)).all())
    assert torch.allclose(fsq.indices_to_codes(out.indices), out.quantized)
    assert out.loss.item() == 0.0


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_gradient_is_derivative_of_the_bound(levels: list[int]) -> None:
    fsq = FSQ(levels)
    z = torch.randn(2, len(levels), 5, 5, dtype=torch.float32, requires_grad=True)
    fsq(z).quantized.sum().backward()
    lv = torch.tensor(levels, dtype=torch.float64).reshape(1, -1, 1, 1)
    half_l = (lv - 1) * (1 + FSQ_EPS) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0)
    shift = torch.atanh(offset / half_l)
    expected = half_l * (1 - torch.tanh(z.detach().double() + shift) ** 2) / torch.floor(lv / 2)
    assert z.grad is not None
    assert torch.allclose(z.grad.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [8, 8, 8, 5, 5, 5]])
def test_indices_match_vector_quantize_pytorch(levels: list[int]) -> None:
    gen = torch.Generator().manual_seed(len(levels))
    z = torch.randn(3, len(levels), 8, 8, generator=gen) * 2
    ours = FSQ(levels)(z)
    ref = ReferenceFSQ(levels=levels)
    ref_codes, ref_idx = ref(z)  # 4-D input is taken as channel-first images
    assert torch.equal(ours.indices, ref_idx.long())
    assert torch.allclose(ours.quantized, ref_codes)


def test_quantizes_in_float32_under_autocast() -> None:
    fsq = FSQ([8, 5, 5, 5])
    z = torch.randn(2, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fsq(z.to(torch.bfloat16))
    assert out.quantized.dtype == torch.float32


def test_rejects_bad_levels() -> None:
    with pytest.raises(ValueError):
        FSQ([])
    with pytest.raises(ValueError):
        FSQ([8, 1])
