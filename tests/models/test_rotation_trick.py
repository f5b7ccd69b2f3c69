"""Rotation trick and STE: forward values and gradients against independent references."""

from __future__ import annotations

import pytest
import torch
from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to

from models.quantizers.functional import rotation_trick, straight_through


def reference_grad(e: torch.Tensor, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """λ·Rᵀ·g written out from arXiv 2410.06424 §4.2 in float64, one row at a time."""
    e, q, g = e.double(), q.double(), g.double()
    out = torch.empty_like(g)
    eye = torch.eye(e.shape[1], dtype=torch.float64)
    for i in range(e.shape[0]):
        e_hat, q_hat = e[i] / e[i].norm(), q[i] / q[i].norm()
        r = (e_hat + q_hat) / (e_hat + q_hat).norm()
        rot = eye - 2 * torch.outer(r, r) + 2 * torch.outer(q_hat, e_hat)
        lam = q[i].norm() / e[i].norm()
        out[i] = lam * rot.T @ g[i]
    return out


def max_row_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)).max())


@pytest.mark.parametrize("dim", [2, 8, 64, 256])
def test_forward_is_the_code_and_gradient_matches_formula(dim: int) -> None:
    gen = torch.Generator().manual_seed(dim)
    e = torch.randn(200, dim, generator=gen).requires_grad_()
    q = torch.randn(200, dim, generator=gen) * 3
    g = torch.randn(200, dim, generator=gen)
    out = rotation_trick(e, q)
    assert torch.equal(out.detach(), q), "forward value must be the selected code, bit for bit"
    out.backward(g)
    assert e.grad is not None
    assert max_row_rel_err(e.grad, reference_grad(e.detach(), q, g)) <= 1e-5


def test_rotation_maps_e_onto_q() -> None:
    """The surrogate λ·R·e must equal q (the rotation is the one taking ê to q̂)."""
    e = torch.randn(50, 16, dtype=torch.float64)
    q = torch.randn(50, 16, dtype=torch.float64)
    g = torch.eye(16, dtype=torch.float64)
    # λ R e = q  <=>  for every basis vector g_j: <λ Rᵀ g_j, e> = q_j
    for j in range(16):
        grad = reference_grad(e, q, g[j].expand(50, 16))
        assert torch.allclose((grad * e).sum(-1), q[:, j], atol=1e-10)


@pytest.mark.parametrize("dim", [4, 32, 256])
def test_gradient_matches_vector_quantize_pytorch(dim: int) -> None:
    gen = torch.Generator().manual_seed(100 + dim)
    e = torch.randn(300, dim, generator=gen)
    q = torch.randn(300, dim, generator=gen)
    g = torch.randn(300, dim, generator=gen)
    ours = e.clone().requires_grad_()
    rotation_trick(ours, q).backward(g)
    theirs = e.clone().requires_grad_()
    ref_out = rotate_to(theirs, q)
    ref_out.backward(g)
    assert ours.grad is not None and theirs.grad is not None
    assert torch.allclose(ref_out.detach(), q, atol=1e-4)
    assert max_row_rel_err(ours.grad, theirs.grad) <= 1e-5


def test_antipodal_and_zero_norm_rows_fall_back_to_ste() -> None:
    gen = torch.Generator().manual_seed(7)
    e = torch.randn(4, 8, generator=gen)
    q = torch.randn(4, 8, generator=gen)
    q[0] = -2.5 * e[0]  # antipodal: ê + q̂ = 0
    e[1] = 0.0  # zero-norm encoder output
    q[2] = 0.0  # zero code
    e = e.requires_grad_()
    g = torch.randn(4, 8, generator=gen)
    out = rotation_trick(e, q)
    out.backward(g)
    assert e.grad is not None
    assert torch.isfinite(e.grad).all() and torch.isfinite(out).all()
    assert torch.equal(out.detach(), q)
    assert torch.allclose(e.grad[:3], g[:3])  # straight-through on the degenerate rows
    assert max_row_rel_err(e.grad[3:], reference_grad(e.detach()[3:], q[3:], g[3:])) <= 1e-5


def test_bf16_input_is_computed_in_float32() -> None:
    e = torch.randn(64, 32).to(torch.bfloat16).requires_grad_()
    q = torch.randn(64, 32).to(torch.bfloat16)
    g = torch.randn(64, 32)
    out = rotation_trick(e, q)
    assert out.dtype == torch.bfloat16 and torch.equal(out.detach(), q)
    out.float().backward(g.to(torch.bfloat16).float())
    assert e.grad is not None
    ref = reference_grad(e.detach().float(), q.float(), g.to(torch.bfloat16).float())
    assert max_row_rel_err(e.grad.float(), ref) <= 1e-2  # bf16 storage of the result


def test_ste_gradient_is_identity() -> None:
    e = torch.randn(10, 6).requires_grad_()
    q = torch.randn(10, 6)
    g = torch.randn(10, 6)
    out = straight_through(e, q)
    out.backward(g)
    assert torch.allclose(out.detach(), q)
    assert e.grad is not None and torch.equal(e.grad, g)
