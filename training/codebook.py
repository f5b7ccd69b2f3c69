"""Codebook retraining: freeze the encoder, re-initialise the codebook from encoder latents on new
data, train it (and optionally the decoder), and write a new model directory.

- Plain VQ: k-means++ seeding, then Lloyd iterations, over encoder latents.
- SimVQ (arXiv 2411.02038): the codebook is C·W with C frozen, so only W is re-fitted: the least-
  squares W that maps C onto the k-means centroids, min_W ‖C·Wᵀ − M‖², keeping C or redrawing it.
- FSQ has no learned codebook: there is nothing to re-initialise; only the decoder can be fine-tuned.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from models.quantizers import FSQ, VectorQuantizer
from models.quantizers.functional import nearest_code, perplexity_from_counts, usage_from_counts
from models.tokenizer import Tokenizer

from .data import Augment, ImageDataset, StreamSampler, collate_skip, open_source, to_float, to_uint8
from .evaluate import progress_bar
from .metrics import psnr

log = logging.getLogger(__name__)


class CodebookError(ValueError):
    """A retraining request that cannot be carried out (e.g. a codebook for FSQ)."""


FSQ_MESSAGE = (
    "FSQ has no learned codebook (its codes are a fixed grid), so there is nothing to re-initialise or retrain; "
    "use --finetune-decoder to fine-tune the decoder on the new data instead"
)


@dataclass
class RetrainOptions:
    codebook_size: int | None = None  # new K (plain VQ and SimVQ); None keeps it
    init: Literal["kmeans", "keep"] = "kmeans"
    steps: int = 500
    finetune_decoder: bool = False
    redraw_basis: bool = False  # SimVQ: draw a new frozen C instead of keeping it
    batch_size: int = 16
    lr: float = 1e-3
    resolution: int = 0  # 0 = the model's native resolution
    max_latents: int = 65536  # latents collected for k-means
    kmeans_iters: int = 10
    eval_images: int = 64  # images (centre crops) for the before/after usage and PSNR
    seed: int = 0
    device: str = "auto"


# --- k-means over latents ---


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator, progress: bool | None = False) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): x (N, D) -> (k, D) initial centres."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device="cpu"))
    centers = [x[first]]
    d2 = (x - x[first]).pow(2).sum(1)
    with progress_bar(k, "codebook: k-means++ seeds", "code", progress) as bar:
        bar.update()
        for _ in range(1, k):
            total = d2.sum()
            if total <= 0:  # fewer distinct points than k: pick uniformly
                idx = int(torch.randint(n, (1,), generator=generator, device="cpu"))
            else:
                probs = (d2 / total).double().cpu()
                idx = int(torch.multinomial(probs, 1, generator=generator))
            centers.append(x[idx])
            d2 = torch.minimum(d2, (x - x[idx]).pow(2).sum(1))
            bar.update()
    return torch.stack(centers)


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator, progress: bool | None = False) -> Tensor:
    """Lloyd's algorithm from k-means++ seeds; an emptied cluster is re-seeded at a random latent.
    `progress`: bars on stderr for the seeding and the iterations (None: only on a terminal)."""
    centers = kmeans_plus_plus(x, k, generator, progress)
    with progress_bar(iters, "codebook: k-means (Lloyd)", "iter", progress) as bar:
        for _ in range(iters):
            assign = nearest_code(x, centers)
            sums = torch.zeros_like(centers).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).to(x.dtype)
            empty = counts == 0
            centers = sums / counts.clamp_min(1)[:, None]
            if empty.any():
                pick = torch.randint(x.shape[0], (int(empty.sum()),), generator=generator, device="cpu").to(x.device)
                centers[empty] = x[pick]
            bar.update()
    return centers


# --- helpers ---


def _batches(data: str, resolution: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    dataset = ImageDataset(open_source(data), Augment(resolution, "random_crop", flip=True), seed=seed)
    sampler = StreamSampler(len(dataset), seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_skip)
    for images, _ in loader:
        if images.shape[0]:
            yield images


def _eval_images(data: str, resolution: int, count: int) -> Tensor:
    dataset = ImageDataset(open_source(data), Augment(resolution, "center_crop", flip=False))
    images = [img for i in range(min(count, len(dataset))) if (img := dataset[i]) is not None]
    if not images:
        raise CodebookError(f"no readable images in {data}")
    return torch.stack(images)


@torch.no_grad()
def measure(
    model: Tokenizer, images: Tensor, batch_size: int = 16, progress: bool | None = False, desc: str = "measure"
) -> dict[str, float]:
    """Usage (over these images), perplexity and mean PSNR (dB) of `model` on uint8 images."""
    model.eval()
    counts = torch.zeros(model.codebook_size, dtype=torch.long)
    scores = []
    with progress_bar(len(images), f"codebook: {desc}", "img", progress) as bar:
        for chunk in images.split(batch_size):
            out = model(to_float(chunk.to(model.device)))
            counts += out.quantizer.counts.cpu()
            scores.append(psnr(chunk, to_uint8(out.reconstruction.clamp(-1, 1)).cpu()))
            bar.update(len(chunk))
    return {
        "usage": usage_from_counts(counts),
        "perplexity": perplexity_from_counts(counts),
        "psnr": float(torch.cat(scores).clamp(max=100).mean()),
    }


@torch.no_grad()
def collect_latents(
    model: Tokenizer, batches: Iterator[Tensor], max_latents: int, generator: torch.Generator, progress: bool | None = False
) -> Tensor:
    """Encoder outputs (N, D) from the new data, at most `max_latents`, cosine-normalised if the quantizer is."""
    model.eval()
    chunks, total = [], 0
    with progress_bar(max_latents, "codebook: k-means latents", "latent", progress) as bar:
        while total < max_latents:
            z = model.encoder(to_float(next(batches).to(model.device)))  # (B, D, h, w)
            e = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            keep = torch.randperm(e.shape[0], generator=generator)[: max_latents - total].to(e.device)
            chunks.append(e[keep])
            total += len(keep)
            bar.update(len(keep))
    latents = torch.cat(chunks)
    q = model.quantizer
    if isinstance(q, VectorQuantizer) and q.cosine:
        latents = F.normalize(latents, dim=-1)
    return latents


def with_codebook_size(model: Tokenizer, k: int) -> Tokenizer:
    """A copy of `model` with a fresh quantizer of K codes; encoder and decoder weights carried over."""
    new = Tokenizer(model.config.replace(codebook_size=k)).to(model.device)
    new.encoder.load_state_dict(model.encoder.state_dict())
    new.decoder.load_state_dict(model.decoder.state_dict())
    return new


@torch.no_grad()
def init_codebook(
    q: VectorQuantizer, latents: Tensor, opts: RetrainOptions, generator: torch.Generator, progress: bool | None = False
) -> None:
    centers = kmeans(latents, q.codebook_size, opts.kmeans_iters, generator, progress)
    if not q.linear_codebook:
        q.embedding.copy_(centers)
        return
    if opts.redraw_basis:
        q.basis.copy_(torch.randn(q.basis.shape, generator=generator).to(q.basis) * q.dim**-0.5)
    # nn.Linear computes C·Wᵀ; solve min ‖C·X − M‖² for X = Wᵀ.
    solution = torch.linalg.lstsq(q.basis.double().cpu(), centers.double().cpu()).solution
    q.proj.weight.copy_(solution.t().to(q.proj.weight))


# --- the whole procedure ---


def retrain_codebook(model: Tokenizer, data: str, opts: RetrainOptions, progress: bool | None = None) -> tuple[Tokenizer, dict[str, Any]]:
    """Returns the retrained model and a report with usage and PSNR before and after.
    `progress`: one bar on stderr per phase (before/after measurement, k-means latents, seeds and
    iterations, training steps); None: only when stderr is a terminal."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device)
    torch.manual_seed(opts.seed)
    generator = torch.Generator().manual_seed(opts.seed)
    model = model.to(device)
    is_fsq = isinstance(model.quantizer, FSQ)
    if is_fsq and not opts.finetune_decoder:
        raise CodebookError(FSQ_MESSAGE)
    if is_fsq and opts.codebook_size not in (None, model.codebook_size):
        raise CodebookError("FSQ's codebook size is fixed by its levels; --codebook-size does not apply")
    resolution = opts.resolution or model.config.resolution
    eval_images = _eval_images(data, resolution, opts.eval_images)
    before = measure(model, eval_images, opts.batch_size, progress, "measure before")
    log.info("before: usage %.2f%%, perplexity %.1f, PSNR %.2f dB", 100 * before["usage"], before["perplexity"], before["psnr"])

    batches = _batches(data, resolution, opts.batch_size, opts.seed)
    if not is_fsq and opts.codebook_size and opts.codebook_size != model.codebook_size:
        if opts.init == "keep":
            raise CodebookError("--init keep cannot change the codebook size; use --init kmeans")
        model = with_codebook_size(model, opts.codebook_size)
    q = model.quantizer
    if isinstance(q, VectorQuantizer) and opts.init == "kmeans":
        latents = collect_latents(model, batches, max(opts.max_latents, q.codebook_size), generator, progress)
        init_codebook(q, latents, opts, generator, progress)
        usage = measure(model, eval_images, opts.batch_size, progress, "measure after k-means")["usage"]
        log.info("k-means over %d latents: usage %.2f%% after init", len(latents), 100 * usage)

    _train(model, batches, opts, progress)
    after = measure(model, eval_images, opts.batch_size, progress, "measure after")
    log.info("after: usage %.2f%%, perplexity %.1f, PSNR %.2f dB", 100 * after["usage"], after["perplexity"], after["psnr"])
    report = {
        "quantizer": "fsq" if is_fsq else ("simvq" if getattr(q, "linear_codebook", False) else "vq"),
        "codebook_size": model.codebook_size,
        "init": "none (FSQ)" if is_fsq else opts.init,
        "steps": opts.steps,
        "finetune_decoder": opts.finetune_decoder,
        "eval_images": len(eval_images),
        "before": before,
        "after": after,
    }
    return model.cpu(), report


def _train(model: Tokenizer, batches: Iterator[Tensor], opts: RetrainOptions, progress: bool | None) -> None:
    model.requires_grad_(False)
    q = model.quantizer
    params: list[Tensor] = []
    if isinstance(q, VectorQuantizer):
        params += [q.proj.weight] if q.linear_codebook else [q.embedding]
    if opts.finetune_decoder:
        params += list(model.decoder.parameters())
    if not params or opts.steps == 0:
        return
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=opts.lr)
    model.eval()  # no dropout/BN in these networks; eval keeps the encoder strictly frozen
    if opts.finetune_decoder:
        model.decoder.train()
    trained = "decoder" if not isinstance(q, VectorQuantizer) else ("codebook + decoder" if opts.finetune_decoder else "codebook")
    with progress_bar(opts.steps, f"codebook: train {trained}", "step", progress) as bar:
        for step in range(opts.steps):
            x = to_float(next(batches).to(model.device))
            with torch.no_grad():
                z = model.encoder(x)
            out = q(z)
            loss = out.codebook_loss  # ‖sg(e) − q‖²: moves the codes toward the latents that pick them
            if opts.finetune_decoder:
                loss = loss + F.l1_loss(model.decoder(out.quantized.detach()), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
            if not bar.disable and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.requires_grad_(True)
