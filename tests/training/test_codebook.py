from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.presets import create_tokenizer
from models.quantizers import VectorQuantizer
from training.codebook import CodebookError, RetrainOptions, kmeans, retrain_codebook

from .conftest import TINY

OPTS = dict(steps=5, batch_size=4, resolution=32, eval_images=8, max_latents=2048, kmeans_iters=3, device="cpu")


def _collapsed(linear: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_tokenizer("cifar-simvq" if linear else "cifar-vq-rotation", codebook_size=64, latent_dim=8, **TINY)
    q = model.quantizer
    assert isinstance(q, VectorQuantizer)
    with torch.no_grad():
        if linear:
            q.proj.weight.zero_()  # C·W = 0: every code the same
        else:
            q.embedding.copy_(q.embedding[:1].expand_as(q.embedding))  # every code the same: argmin ties pick code 0
    return model


@pytest.mark.parametrize("linear", [False, True], ids=["vq", "simvq"])
def test_retraining_raises_usage_of_a_collapsed_codebook(few_photos: Path, linear: bool) -> None:
    model = _collapsed(linear)
    new, report = retrain_codebook(model, str(few_photos), RetrainOptions(**OPTS))  # type: ignore[arg-type]
    before, after = report["before"]["usage"], report["after"]["usage"]
    assert before < 0.1
    assert after > 0.4 and after > 4 * before, report
    torch.testing.assert_close(new.encoder.conv_in.weight, model.encoder.conv_in.weight)  # encoder frozen


def test_new_codebook_size(few_photos: Path) -> None:
    new, report = retrain_codebook(_collapsed(False), str(few_photos), RetrainOptions(codebook_size=32, **OPTS))  # type: ignore[arg-type]
    assert new.codebook_size == 32 and report["codebook_size"] == 32


def test_fsq_says_so(few_photos: Path) -> None:
    model = create_tokenizer("cifar-fsq", **TINY)
    with pytest.raises(CodebookError, match="FSQ has no learned codebook"):
        retrain_codebook(model, str(few_photos), RetrainOptions(**OPTS))  # type: ignore[arg-type]
    _, report = retrain_codebook(model, str(few_photos), RetrainOptions(finetune_decoder=True, **OPTS))  # type: ignore[arg-type]
    assert report["quantizer"] == "fsq" and report["init"] == "none (FSQ)"


def test_kmeans_finds_separated_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (centers[:, None, :] + 0.1 * torch.randn(3, 50, 2, generator=g)).reshape(-1, 2)
    found = kmeans(x, 3, 5, g)
    dist = torch.cdist(centers, found).min(dim=1).values
    assert (dist < 0.2).all()
