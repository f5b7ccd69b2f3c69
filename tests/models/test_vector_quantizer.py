"""VectorQuantizer and SimVQ: search, losses, indices_to_codes, what learns and what stays frozen."""

from __future__ import annotations

import pytest
import torch

from models.quantizers import QuantizerOutput, VectorQuantizer
from models.quantizers.functional import TIE_LATENT, near_tie_mask, near_ties, nearest_code, perplexity_from_counts, usage_from_counts


def brute_force(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(z.double(), codebook.double()).argmin(-1)


@pytest.mark.parametrize("max_elements", [1 << 24, 1000, 1])
def test_nearest_code_equals_brute_force(max_elements: int) -> None:
    gen = torch.Generator().manual_seed(max_elements)
    z, codebook = torch.randn(777, 16, generator=gen), torch.randn(300, 16, generator=gen)
    ours, ref = nearest_code(z, codebook, max_elements), brute_force(z, codebook)
    d = torch.cdist(z.double(), codebook.double())
    gap = d.gather(1, ours[:, None]) - d.gather(1, ref[:, None])
    assert float(gap.max()) <= 1e-5  # a different pick only on an exact float tie
    assert (ours == ref).float().mean() >= 0.999


@pytest.mark.parametrize("dim", [8, 256])
def test_search_at_65536_codes(dim: int) -> None:
    gen = torch.Generator().manual_seed(dim)
    codebook = torch.randn(65536, dim, generator=gen)
    z = codebook[torch.randint(0, 65536, (96,), generator=gen)] + 1e-3 * torch.randn(96, dim, generator=gen)
    expected = brute_force(z, codebook)
    assert torch.equal(nearest_code(z, codebook), expected)


@pytest.mark.parametrize("gradient", ["rotation", "ste"])
@pytest.mark.parametrize("linear_codebook", [False, True])
@pytest.mark.parametrize("cosine", [False, True])
def test_forward_output_is_the_codebook_entry(gradient: str, linear_codebook: bool, cosine: bool) -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 64, gradient=gradient, linear_codebook=linear_codebook, cosine=cosine)  # type: ignore[arg-type]
    z = torch.randn(3, 16, 5, 7, requires_grad=True)
    out = vq(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == (3, 16, 5, 7) and out.indices.shape == (3, 5, 7) and out.indices.dtype == torch.int64
    codes = vq.indices_to_codes(out.indices)
    assert torch.allclose(out.quantized, codes, atol=1e-6)
    assert torch.equal(
        out.indices.reshape(-1),
        brute_force(
            torch.nn.functional.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, 16), dim=-1)
            if cosine
            else z.detach().permute(0, 2, 3, 1).reshape(-1, 16),
            vq.codebook().detach(),
        ),
    )
    (out.quantized.sum() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert int(out.counts.sum()) == 3 * 5 * 7
    # train and eval give the same output type and values
    vq.eval()
    again = vq(z.detach())
    assert torch.equal(again.indices, out.indices)


def test_losses_follow_the_formula() -> None:
    torch.manual_seed(1)
    vq = VectorQuantizer(8, 32, beta=0.4, linear_codebook=False)
    z = torch.randn(2, 8, 4, 4)
    out = vq(z)
    q = vq.indices_to_codes(out.indices)
    mse = float(((q - z) ** 2).mean().detach())
    assert out.codebook_loss.item() == pytest.approx(mse, rel=1e-5)
    assert out.commitment_loss.item() == pytest.approx(mse, rel=1e-5)
    assert out.loss.item() == pytest.approx(1.4 * mse, rel=1e-5)


def test_simvq_step_changes_w_and_never_c() -> None:
    torch.manual_seed(2)
    vq = VectorQuantizer(16, 128, linear_codebook=True)
    basis_before = vq.basis.clone()
    w_before = vq.proj.weight.detach().clone()
    assert all(p is not vq.basis for p in vq.parameters())
    opt = torch.optim.AdamW(vq.parameters(), lr=1e-2)
    z = torch.randn(4, 16, 6, 6, requires_grad=True)
    out = vq(z)
    (out.quantized.pow(2).mean() + out.loss).backward()
    opt.step()
    assert torch.equal(vq.basis, basis_before), "C must stay bit-for-bit frozen"
    assert not torch.equal(vq.proj.weight, w_before), "W must learn"
    # decoding goes through W: the effective codebook is C·W
    assert torch.allclose(vq.codebook(), vq.basis @ vq.proj.weight.T)
    out2 = vq(z.detach())
    assert torch.allclose(vq.indices_to_codes(out2.indices), out2.quantized, atol=1e-6)


def test_usage_and_perplexity() -> None:
    counts = torch.tensor([5, 5, 0, 0])
    assert usage_from_counts(counts) == 0.5
    assert perplexity_from_counts(counts) == pytest.approx(2.0)
    assert perplexity_from_counts(torch.tensor([7, 0, 0])) == pytest.approx(1.0)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="gradient"):
        VectorQuantizer(8, 16, gradient="bogus")  # type: ignore[arg-type]
    vq = VectorQuantizer(8, 16)
    with pytest.raises(ValueError, match="expected latents"):
        vq(torch.randn(2, 4, 3, 3))


def test_near_ties_excuse_only_codes_a_rounding_could_swap() -> None:
    """Codes 0 = (0, 0) and 1 = (2, 0) are equidistant from (1, 0): an exact tie. (0.1, 0) is clearly
    nearer code 0. (1 ± δ, 0) is δ from the boundary: a tie within TIE_LATENT of the set's RMS latent
    norm, not at three times that."""
    codebook = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    xs = torch.tensor([1.0, 0.1, 1.0, 1.0, 1.0], dtype=torch.float64)
    rms = float(xs.pow(2).mean().sqrt())  # the latents lie on the x axis: RMS of |x|
    xs[3] += 0.5 * TIE_LATENT * rms
    xs[4] += 3 * TIE_LATENT * rms
    rms = float(xs.pow(2).mean().sqrt())
    latents = torch.stack([xs, torch.zeros_like(xs)]).reshape(1, 2, 1, 5)  # (B, D, h, w)
    ids = torch.tensor([[[1, 1, 0, 1, 1]]])
    reference = torch.tensor([[[0, 0, 0, 0, 0]]])  # position 2 agrees
    assert near_tie_mask(latents, codebook, ids, reference).tolist() == [[[True, False, False, True, False]]]
    assert near_ties(latents, codebook, ids, reference) == 2
    assert near_ties(latents, codebook, reference, reference) == 0
    assert near_ties(latents.float(), codebook.float(), ids, reference) == 2  # float32 inputs are judged in float64
    assert abs(xs[4] - 1) / rms > 2.9 * TIE_LATENT  # the non-tie is past the tolerance, not at its edge
