"""Codebook retraining: freeze the encoder, re-initialise the codebook from encoder latents on new
data, train it (and optionally the decoder), keep the best candidate on held-out images, and write a
new model directory.

1. Held out: `--heldout DIR`, else `eval_images` images of the data set aside (never trained on).
2. Latents: the training images are encoded once (the encoder is frozen) and the latent grids cached:
   k-means, codebook training and decoder fine-tuning all read the cache, never the encoder again.
   Default: 64 latents a code, at least 65,536 (a 256² image at f = 8 gives 1,024).
3. Init: k-means over the cached latents: batched D² seeding (k-means++ drawing many seeds a round),
   Lloyd iterations, every empty cluster re-seeded at the latents farthest from their centres.
   - Plain VQ: the codebook is the centroids.
   - SimVQ (arXiv 2411.02038): the codebook is C·Wᵀ with C frozen. The basis becomes the centroids and
     W the identity, so C·Wᵀ equals them exactly. (A least-squares W over the old random C cannot: W has
     D² numbers for K·D targets, so it leaves most of the centroids unexplained and shrinks the codes
     towards the origin, and most of them go unused: docs/codebook-retrain.md has the figures.)
   - `quantizer="simvq"`: a plain codebook (e.g. an imported taming model's) becomes a SimVQ one:
     `linear_codebook=True`, `gradient="rotation"`, its encoder and decoder reused.
4. Train the codebook on ‖sg(e) − q‖² over mini-batches of cached latents; every `restart_every` steps
   the codes no latent picked are restarted at latents drawn by their quantisation error (for SimVQ the
   rows of C are set so that C·Wᵀ lands there).
5. Optionally fine-tune the decoder (L1) on crops of the cached grids and their pixels.
6. Every candidate (the original where K and quantizer are unchanged, the k-means codebook, the trained
   codebook, the fine-tuned decoder) is measured on the held-out images and the best kept (PSNR, or
   LPIPS-Alex with `select="lpips"`) among those not much worse on the other metric (`_eligible`: a
   fine-tuned decoder can buy PSNR with blur); the report lists them all, which was kept, which was
   passed over and why, and says so when the kept model is below the original.
FSQ has no learned codebook: there is nothing to re-initialise; only the decoder can be fine-tuned.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.quantizers import FSQ, VectorQuantizer
from models.quantizers.functional import code_distances, perplexity_from_counts, usage_from_counts
from models.tokenizer import Tokenizer

from .data import Augment, ImageSource, MultiSource, decode_image, open_train_sources, to_float, to_uint8
from .evaluate import load_lpips_alex, lpips_per_image, progress_bar
from .metrics import psnr

log = logging.getLogger(__name__)


class CodebookError(ValueError):
    """A retraining request that cannot be carried out (e.g. a codebook for FSQ)."""


FSQ_MESSAGE = (
    "FSQ has no learned codebook (its codes are a fixed grid), so there is nothing to re-initialise or retrain; "
    "use --finetune-decoder to fine-tune the decoder on the new data instead"
)
LATENTS_PER_CODE = 64
MIN_LATENTS = 65536
MAX_PASSES = 4  # over the training images (random crops and flips differ each pass) when collecting latents
ILL_CONDITIONED = 1e6  # cond(W) above which a SimVQ restart cannot invert W


@dataclass
class RetrainOptions:
    codebook_size: int | None = None  # new K (plain VQ and SimVQ); None keeps it
    init: Literal["kmeans", "keep"] = "kmeans"
    quantizer: Literal["keep", "simvq"] = "keep"  # "simvq": a plain codebook becomes SimVQ (C frozen, W learned, rotation trick)
    steps: int = 200  # codebook training steps (mini-batches of cached latents, batch_size images' worth)
    finetune_decoder: bool = False
    decoder_steps: int = 0  # 0: `steps`
    decoder_lr: float = 1e-4
    decoder_crop: int = 0  # decoder fine-tuning crop in pixels; 0: half the resolution (at least 8 latents)
    batch_size: int = 16
    lr: float = 1e-3
    resolution: int = 0  # 0 = the model's native resolution
    max_latents: int = 0  # latents cached for k-means and training; 0: 64 a code, at least 65,536
    kmeans_iters: int = 20
    restart_every: int = 20  # codebook steps between dead-code restarts; 0: none
    heldout: str | None = None  # images for the before/after numbers and the choice; None: held out of the data
    eval_images: int = 64  # held-out images (centre crops)
    select: Literal["psnr", "lpips"] = "psnr"
    seed: int = 0
    device: str = "auto"


# --- k-means over latents ---


def assign(x: Tensor, centers: Tensor, max_elements: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """Nearest centre of every row of x (N, D) -> (indices (N,), squared distances (N,)), in chunks."""
    centers_sq = centers.pow(2).sum(-1)
    rows = max(1, max_elements // centers.shape[0])
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    d2 = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], rows):
        chunk = x[start : start + rows]
        best = code_distances(chunk, centers, centers_sq).min(dim=-1)  # −2x·c + ‖c‖²: ‖x‖² left out
        idx[start : start + rows] = best.indices
        d2[start : start + rows] = (best.values + chunk.pow(2).sum(-1)).clamp_min(0)
    return idx, d2


def _min_sq_dist(x: Tensor, centers: Tensor) -> Tensor:
    return assign(x, centers)[1]


def _draw(weights: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n distinct row indices drawn with probability ∝ weights, never a row of weight 0 (uniformly
    where all are 0): Efraimidis–Spirakis keys w / Exp(1), the n largest. (torch.multinomial without
    replacement can return rows of weight 0, which k-means++ seeding must never pick.)"""
    w = weights.double().cpu()
    if not bool((w > 0).any()):
        w = torch.ones_like(w)
    n = min(n, int((w > 0).sum()))
    keys = w / torch.empty_like(w).exponential_(generator=generator)
    return keys.topk(n).indices.to(weights.device)


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator, progress: bool | None = False, per_round: int = 0) -> Tensor:
    """D² seeding (Arthur & Vassilvitskii 2007) of k centres from x (N, D), `per_round` seeds drawn
    together each round (default k/32: 32 rounds of matrix products instead of k sequential scans,
    k-means++ itself for k ≤ 32). Rows of x are drawn without replacement, so k distinct points where
    x has them."""
    n = x.shape[0]
    per_round = per_round or max(1, k // 32)
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first : first + 1]]
    d2 = (x - x[first]).pow(2).sum(1)
    have = 1
    with progress_bar(k, "codebook: k-means seeds", "code", progress) as bar:
        bar.update()
        while have < k:
            pick = _draw(d2, min(per_round, k - have), generator)
            if len(pick) == 0:
                break
            new = x[pick]
            centers.append(new)
            d2 = torch.minimum(d2, _min_sq_dist(x, new))
            d2[pick] = 0  # exactly: the matmul form leaves rounding, and a drawn row must not come again
            have += len(pick)
            bar.update(len(pick))
    out = torch.cat(centers)
    if len(out) < k:  # fewer distinct points than k: repeat some (Lloyd leaves the copies empty, re-seeded)
        extra = torch.randint(n, (k - len(out),), generator=generator).to(x.device)
        out = torch.cat([out, x[extra]])
    return out


def reseed_empty(centers: Tensor, empty: Tensor, x: Tensor, d2: Tensor) -> int:
    """Moves the empty centres onto the latents farthest from their own centres (largest d2), in
    place; the rows chosen are distinct. Returns how many moved."""
    count = int(empty.sum())
    if count == 0:
        return 0
    far = d2.topk(min(count, len(d2))).indices
    where = empty.nonzero().squeeze(1)[: len(far)]
    centers[where] = x[far]
    d2[far] = 0
    return len(far)


def kmeans(
    x: Tensor, k: int, iters: int, generator: torch.Generator, progress: bool | None = False, stats: dict[str, Any] | None = None
) -> Tensor:
    """Lloyd's algorithm from D² seeds; empty clusters re-seeded at the farthest latents. x: (N, D) -> (k, D).
    `stats`, when given, receives the seeding's and each iteration's empty clusters and mean squared error."""
    centers = kmeans_plus_plus(x, k, generator, progress)
    history: list[dict[str, float]] = []
    with progress_bar(iters, "codebook: k-means (Lloyd)", "iter", progress) as bar:
        for _ in range(iters):
            idx, d2 = assign(x, centers)
            counts = torch.bincount(idx, minlength=k)
            empty = counts == 0
            history.append({"mse": float(d2.mean()), "empty": int(empty.sum())})
            sums = torch.zeros_like(centers).index_add_(0, idx, x)
            centers = sums / counts.clamp_min(1).to(x.dtype)[:, None]
            reseed_empty(centers, empty, x, d2)
            bar.update()
    if stats is not None:
        idx, d2 = assign(x, centers)
        stats.update(
            latents=len(x),
            iterations=history,
            final_mse=float(d2.mean()),
            final_empty=int((torch.bincount(idx, minlength=k) == 0).sum()),
        )
    return centers


# --- data ---


class _Subset:
    """Some items of a source, by index."""

    def __init__(self, source: ImageSource | MultiSource, indices: Sequence[int]) -> None:
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int) -> np.ndarray | None:
        item = self.source.item(self.indices[i])
        try:
            return decode_image(item.read())
        except Exception as exc:  # PIL raises many types; any of them means "skip this file"
            log.warning("skipping unreadable image %s: %s", item.key, exc)
            return None


def _open(data: str | Sequence[str]) -> MultiSource:
    return open_train_sources([data] if isinstance(data, str) else list(data))[0]


def split_data(data: str | Sequence[str], heldout: str | None, eval_images: int, seed: int) -> tuple[_Subset, _Subset]:
    """(training images, held-out images). Without `heldout`, `eval_images` images of the data (at
    most a quarter of it, a seeded draw) are set aside."""
    source = _open(data)
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    if heldout:
        other = _open(heldout)
        return _Subset(source, order), _Subset(other, range(min(eval_images, len(other))))
    n_out = min(eval_images, len(source) // 4)
    if n_out < 1:
        raise CodebookError(f"{len(source)} images cannot spare held-out ones: give more images or --heldout")
    return _Subset(source, sorted(order[n_out:])), _Subset(source, sorted(order[:n_out]))


def _images(subset: _Subset, augment: Augment, seed: int, passes: int) -> Iterator[Tensor]:
    """uint8 (3, r, r) crops of the subset's images, a new permutation each pass."""
    for p in range(passes):
        perm = torch.randperm(len(subset), generator=torch.Generator().manual_seed(seed * 100_003 + p)).tolist()
        for i in perm:
            img = subset.image(i)
            if img is not None:
                yield torch.from_numpy(augment(img, np.random.default_rng([seed, p, i]))).permute(2, 0, 1)


def _chunks(images: Iterator[Tensor], size: int) -> Iterator[Tensor]:
    group: list[Tensor] = []
    for img in images:
        group.append(img)
        if len(group) == size:
            yield torch.stack(group)
            group = []
    if group:
        yield torch.stack(group)


@dataclass
class LatentCache:
    """Encoder outputs of the training crops, (N, D, h, w) float32, and the crops (N, 3, H, W) uint8 where kept."""

    grids: Tensor
    images: Tensor | None

    def flat(self, cosine: bool) -> Tensor:
        e = self.grids.permute(0, 2, 3, 1).reshape(-1, self.grids.shape[1])
        return F.normalize(e, dim=-1) if cosine else e

    @property
    def count(self) -> int:
        return self.grids.shape[0] * self.grids.shape[2] * self.grids.shape[3]


@torch.no_grad()
def encode_images(
    model: Tokenizer,
    batches: Iterator[Tensor],
    max_latents: int,
    keep_images: bool,
    progress: bool | None = False,
    desc: str = "encode",
    total: int | None = None,
) -> LatentCache:
    """Runs the (frozen) encoder once over `batches` until `max_latents` latents (whole grids)."""
    model.eval()
    grids: list[Tensor] = []
    images: list[Tensor] = []
    count = 0
    with progress_bar(total, f"codebook: {desc}", "img", progress) as bar:
        for batch in batches:
            z = model.encoder(to_float(batch.to(model.device))).float()
            grids.append(z)
            if keep_images:
                images.append(batch.to(model.device))
            count += z.shape[0] * z.shape[2] * z.shape[3]
            bar.update(len(batch))
            if count >= max_latents:
                break
    if not grids:
        raise CodebookError("no readable images")
    return LatentCache(torch.cat(grids), torch.cat(images) if keep_images else None)


# --- measuring a candidate on the held-out images ---


@torch.no_grad()
def measure_cached(
    model: Tokenizer, heldout: LatentCache, lpips_model: Any, batch_size: int = 16, progress: bool | None = False, desc: str = "measure"
) -> dict[str, Any]:
    """Usage (over these images), perplexity, mean PSNR (dB) and LPIPS-Alex (None without its weights)
    of `model` on the held-out images, from their cached latents (the encoder is frozen)."""
    assert heldout.images is not None
    model.eval()
    counts = torch.zeros(model.codebook_size, dtype=torch.long)
    scores: list[Tensor] = []
    lp: list[float] = []
    with progress_bar(len(heldout.grids), f"codebook: {desc}", "img", progress) as bar:
        for z, x in zip(heldout.grids.split(batch_size), heldout.images.split(batch_size), strict=True):
            q = model.quantizer(z)
            counts += q.counts.cpu()
            rec = to_uint8(model.decoder(q.quantized).clamp(-1, 1))
            scores.append(psnr(x.cpu(), rec.cpu()))
            if lpips_model is not None:
                lp += lpips_per_image(lpips_model, x, rec)
            bar.update(len(z))
    return {
        "usage": usage_from_counts(counts),
        "perplexity": perplexity_from_counts(counts),
        "psnr": float(torch.cat(scores).clamp(max=100).mean()),
        "lpips_alex": float(np.mean(lp)) if lp else None,
    }


# --- the new quantizer ---


def with_codebook(model: Tokenizer, k: int, simvq: bool) -> Tokenizer:
    """A copy of `model` with a fresh quantizer of K codes (SimVQ with rotation-trick gradients where
    `simvq`); encoder and decoder weights carried over."""
    changes: dict[str, Any] = {"codebook_size": k}
    if simvq:
        changes.update(linear_codebook=True, gradient="rotation")
    new = Tokenizer(model.config.replace(**changes)).to(model.device)
    new.encoder.load_state_dict(model.encoder.state_dict())
    new.decoder.load_state_dict(model.decoder.state_dict())
    return new


@torch.no_grad()
def set_codebook(q: VectorQuantizer, codes: Tensor) -> None:
    """Makes the effective codebook exactly `codes` (K, D): the embedding for plain VQ; for SimVQ the
    basis C = codes and W = I, so that C·Wᵀ = codes (a least-squares W over a random C cannot place K ≫ D codes)."""
    if q.linear_codebook:
        q.basis.copy_(codes.to(q.basis))
        q.proj.weight.copy_(torch.eye(q.dim, dtype=q.proj.weight.dtype, device=q.proj.weight.device))
    else:
        q.embedding.copy_(codes.to(q.embedding))


@torch.no_grad()
def set_codes(q: VectorQuantizer, rows: Tensor, codes: Tensor) -> bool:
    """Moves the codes `rows` to `codes` (n, D), the others unchanged. SimVQ: the rows of C such that
    C·Wᵀ = codes. False where W is too ill-conditioned to invert (nothing moved)."""
    if not q.linear_codebook:
        q.embedding[rows] = codes.to(q.embedding)
        return True
    w = q.proj.weight.double()
    if not bool(torch.isfinite(w).all()):
        return False
    sv = torch.linalg.svdvals(w)
    if float(sv.min()) * ILL_CONDITIONED <= float(sv.max()):
        return False
    # C·Wᵀ = M  <=>  W·Cᵀ = Mᵀ
    q.basis[rows] = torch.linalg.solve(w, codes.double().t()).t().to(q.basis)
    return True


@torch.no_grad()
def init_codebook(
    q: VectorQuantizer, latents: Tensor, opts: RetrainOptions, generator: torch.Generator, progress: bool | None = False
) -> dict[str, Any]:
    """k-means over `latents` (N, D), the result made the codebook; returns k-means' statistics."""
    stats: dict[str, Any] = {}
    centers = kmeans(latents, q.codebook_size, opts.kmeans_iters, generator, progress, stats)
    set_codebook(q, centers)
    return stats


# --- the whole procedure ---


def _state(model: Tokenizer) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}


# What `select` may trade for its own metric. A decoder fine-tuned with L1 gains a little PSNR by
# blurring and loses much more on LPIPS ("best PSNR" alone kept such a decoder: docs/codebook-retrain.md).
# A candidate this much worse on the other metric than the best candidate on it is not kept, and the
# report says which was passed over and why.
GUARD_LPIPS_RELATIVE = 0.10  # select="psnr": LPIPS-Alex at most 10 % above the lowest candidate's
GUARD_PSNR_DB = 0.5  # select="lpips": PSNR at most 0.5 dB below the highest candidate's


def _eligible(candidates: dict[str, dict[str, Any]], select: str) -> dict[str, dict[str, Any]]:
    """The candidates within the guard on the metric `select` does not rank by (never empty: the best
    on that metric is always within it)."""
    if select == "lpips":
        top = max(c["psnr"] for c in candidates.values())
        return {n: c for n, c in candidates.items() if c["psnr"] >= top - GUARD_PSNR_DB}
    lpips = [c["lpips_alex"] for c in candidates.values() if c["lpips_alex"] is not None]
    if not lpips:  # no LPIPS weights: PSNR alone
        return candidates
    floor = min(lpips)
    return {n: c for n, c in candidates.items() if c["lpips_alex"] is None or c["lpips_alex"] <= floor * (1 + GUARD_LPIPS_RELATIVE)}


def _passed_over(candidates: dict[str, dict[str, Any]], kept: str, select: str) -> str | None:
    """Why the best candidate on `select` alone was not kept, or None when it was."""
    unguarded = _best_of(candidates, select)
    if unguarded == kept:
        return None
    a, b = candidates[unguarded], candidates[kept]
    if select == "lpips":
        return (
            f"'{unguarded}' has the lowest LPIPS ({a['lpips_alex']:.4f} against {b['lpips_alex']:.4f}) but its PSNR is "
            f"{b['psnr'] - a['psnr']:.2f} dB below '{kept}' (more than {GUARD_PSNR_DB} dB): '{kept}' was kept"
        )
    return (
        f"'{unguarded}' has the highest PSNR ({a['psnr']:.2f} against {b['psnr']:.2f} dB) but its LPIPS is "
        f"{100 * (a['lpips_alex'] / b['lpips_alex'] - 1):.0f} % above '{kept}' ({a['lpips_alex']:.4f} against {b['lpips_alex']:.4f}; "
        f"more than {100 * GUARD_LPIPS_RELATIVE:.0f} % above the best): '{kept}' was kept"
    )


def _better(a: dict[str, Any], b: dict[str, Any], select: str) -> bool:
    """a better than b on the held-out images."""
    if select == "lpips" and a["lpips_alex"] is not None and b["lpips_alex"] is not None:
        return bool(a["lpips_alex"] < b["lpips_alex"])
    return bool(a["psnr"] > b["psnr"])


def retrain_codebook(
    model: Tokenizer, data: str | Sequence[str], opts: RetrainOptions, progress: bool | None = None
) -> tuple[Tokenizer, dict[str, Any]]:
    """Returns the kept model and a report: the original and every candidate measured on held-out
    images, the one kept, k-means statistics and each phase's seconds.
    `progress`: one bar on stderr per phase; None: only when stderr is a terminal."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        seconds[name] = round(now - since, 2)
        return now

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device)
    torch.manual_seed(opts.seed)
    generator = torch.Generator().manual_seed(opts.seed)
    model = model.to(device)
    is_fsq = isinstance(model.quantizer, FSQ)
    if is_fsq and not opts.finetune_decoder:
        raise CodebookError(FSQ_MESSAGE)
    if is_fsq and opts.codebook_size not in (None, model.codebook_size):
        raise CodebookError("FSQ's codebook size is fixed by its levels; --codebook-size does not apply")
    if is_fsq and opts.quantizer != "keep":
        raise CodebookError("FSQ has no codebook to turn into a SimVQ one (--quantizer simvq)")
    q0 = model.quantizer
    to_simvq = opts.quantizer == "simvq" and isinstance(q0, VectorQuantizer) and not q0.linear_codebook
    if to_simvq and q0.cosine:
        raise CodebookError("--quantizer simvq: a cosine codebook cannot become a SimVQ one")
    new_k = opts.codebook_size or model.codebook_size
    resizing = not is_fsq and new_k != model.codebook_size
    if resizing and opts.init == "keep":
        raise CodebookError("--init keep cannot change the codebook size; use --init kmeans")
    resolution = opts.resolution or model.config.resolution
    if resolution % model.downsample:
        raise CodebookError(f"resolution {resolution} is not a multiple of the downsample factor {model.downsample}")

    # 1. held-out images, encoded once
    t = time.perf_counter()
    train_set, heldout_set = split_data(data, opts.heldout, opts.eval_images, opts.seed)
    centre = Augment(resolution, "center_crop", flip=False)
    heldout = encode_images(
        model,
        _chunks(_images(heldout_set, centre, opts.seed, 1), opts.batch_size),
        1 << 62,
        True,
        progress,
        "encode held-out",
        len(heldout_set),
    )
    lpips_model, lpips_reason = load_lpips_alex(device)
    before = measure_cached(model, heldout, lpips_model, opts.batch_size, progress, "measure before")
    log.info("before: usage %.2f%%, perplexity %.1f, PSNR %.2f dB", 100 * before["usage"], before["perplexity"], before["psnr"])
    t = lap("encode held-out + measure before", t)

    # 2. training latents, encoded once
    per_image = (resolution // model.downsample) ** 2
    max_latents = opts.max_latents or max(MIN_LATENTS, LATENTS_PER_CODE * new_k)
    passes = min(MAX_PASSES, max(1, math.ceil(max_latents / (per_image * len(train_set)))))
    random_crop = Augment(resolution, "random_crop", flip=True)
    cache = encode_images(
        model,
        _chunks(_images(train_set, random_crop, opts.seed, passes), opts.batch_size),
        max_latents,
        opts.finetune_decoder,
        progress,
        "encode training images",
        min(passes * len(train_set), math.ceil(max_latents / per_image)),
    )
    t = lap("encode training images", t)

    candidates: dict[str, dict[str, Any]] = {}
    states: dict[str, dict[str, Tensor]] = {}
    k_before = model.codebook_size
    if not (resizing or to_simvq):  # the original is one of the options
        candidates["original"], states["original"] = before, _state(model)
    else:
        model = with_codebook(model, new_k, to_simvq)
    q = model.quantizer
    kmeans_stats: dict[str, Any] | None = None
    restarts = 0
    if isinstance(q, VectorQuantizer):
        name = ""
        if opts.init == "kmeans":
            kmeans_stats = init_codebook(q, cache.flat(q.cosine), opts, generator, progress)
            t = lap("kmeans", t)
            name = "k-means"
        elif to_simvq:  # the old codebook as the basis, W = I: the same codes, now SimVQ
            assert isinstance(q0, VectorQuantizer)
            set_codebook(q, q0.codebook().detach())
            name = "kept codes as SimVQ"
        if name:
            candidates[name] = measure_cached(model, heldout, lpips_model, opts.batch_size, progress, f"measure {name}")
            states[name] = _state(model)
            t = lap(f"measure {name}", t)
        if opts.steps:
            restarts = _train_codebook(model, cache, opts, generator, progress)
            t = lap("train codebook", t)
            candidates["codebook trained"] = measure_cached(model, heldout, lpips_model, opts.batch_size, progress, "measure trained")
            states["codebook trained"] = _state(model)
            t = lap("measure codebook trained", t)
    if opts.finetune_decoder:
        # from the best codebook so far
        best = _best(candidates, opts.select)
        model.load_state_dict(states[best], strict=False)
        _finetune_decoder(model, cache, opts, generator, progress)
        t = lap("fine-tune decoder", t)
        name = f"{best} + decoder"
        candidates[name] = measure_cached(model, heldout, lpips_model, opts.batch_size, progress, "measure decoder")
        states[name] = _state(model)
        t = lap("measure decoder", t)

    kept = _best(candidates, opts.select)
    model.load_state_dict(states[kept], strict=False)
    after = candidates[kept]
    log.info("after (%s): usage %.2f%%, perplexity %.1f, PSNR %.2f dB", kept, 100 * after["usage"], after["perplexity"], after["psnr"])
    seconds["total"] = round(time.perf_counter() - started, 2)
    worse = after["psnr"] < before["psnr"]
    report: dict[str, Any] = {
        "quantizer": "fsq" if is_fsq else ("simvq" if getattr(q, "linear_codebook", False) else "vq"),
        "converted_to_simvq": to_simvq,
        "codebook_size_before": k_before,
        "codebook_size": model.codebook_size,
        "init": "none (FSQ)" if is_fsq else opts.init,
        "steps": opts.steps if not is_fsq else 0,
        "restarts": restarts,
        "finetune_decoder": opts.finetune_decoder,
        "decoder_steps": (opts.decoder_steps or opts.steps) if opts.finetune_decoder else 0,
        "heldout": opts.heldout or f"{len(heldout_set)} images held out of the data (never trained on)",
        "eval_images": len(heldout.grids),
        "training_images": len(train_set),
        "latents": cache.count,
        "kmeans": kmeans_stats,
        "lpips_note": lpips_reason or "LPIPS v0.1 AlexNet, per image, averaged",
        "select": opts.select,
        "before": before,
        "candidates": candidates,
        "kept": kept,
        "after": after,
        "worse_than_before": worse,
        "seconds": seconds,
        "device": str(device),
        "options": asdict(opts),
    }
    passed_over = _passed_over(candidates, kept, opts.select)
    if passed_over:
        report["passed_over"] = passed_over
    if worse:
        report["note"] = f"the kept model is {before['psnr'] - after['psnr']:.2f} dB PSNR below the original on the held-out images" + (
            f" (K {report['codebook_size_before']} -> {model.codebook_size}: fewer bits a token)" if resizing else ""
        )
    return model.cpu(), report


def _best_of(candidates: dict[str, dict[str, Any]], select: str) -> str:
    best = next(iter(candidates))
    for name, scores in candidates.items():
        if _better(scores, candidates[best], select):
            best = name
    return best


def _best(candidates: dict[str, dict[str, Any]], select: str) -> str:
    """The best candidate on `select` among those within the guard on the other metric (`_eligible`)."""
    return _best_of(_eligible(candidates, select), select)


def _train_codebook(model: Tokenizer, cache: LatentCache, opts: RetrainOptions, generator: torch.Generator, progress: bool | None) -> int:
    """Adam on ‖sg(e) − q‖² over mini-batches of cached latents, dead codes restarted every
    `restart_every` steps at latents drawn by their error. Returns how many codes were restarted."""
    q = model.quantizer
    assert isinstance(q, VectorQuantizer)
    latents = cache.flat(q.cosine)
    per_step = min(len(latents), opts.batch_size * cache.grids.shape[2] * cache.grids.shape[3])
    param = q.proj.weight if q.linear_codebook else q.embedding
    model.requires_grad_(False)
    param.requires_grad_(True)
    optimizer = torch.optim.Adam([param], lr=opts.lr)
    hits = torch.zeros(q.codebook_size, dtype=torch.long, device=latents.device)
    restarted = 0
    with progress_bar(opts.steps, "codebook: train codebook", "step", progress) as bar:
        for step in range(opts.steps):
            e = latents[torch.randint(len(latents), (per_step,), generator=generator).to(latents.device)]
            codebook = q.codebook()
            idx, d2 = assign(e, codebook.detach())
            loss = F.mse_loss(F.embedding(idx, codebook), e)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            hits += torch.bincount(idx, minlength=q.codebook_size)
            if opts.restart_every and (step + 1) % opts.restart_every == 0:
                dead = (hits == 0).nonzero().squeeze(1)
                if len(dead):
                    pick = _draw(d2, len(dead), generator)
                    if set_codes(q, dead[: len(pick)], e[pick].detach()):
                        restarted += len(pick)
                        if not q.linear_codebook:  # the moved rows start afresh in Adam
                            for s in optimizer.state[param].values():
                                if isinstance(s, Tensor) and s.shape == param.shape:
                                    s[dead[: len(pick)]] = 0
                hits.zero_()
            bar.update()
            if not bar.disable and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", restarted=restarted, refresh=False)
    model.requires_grad_(True)
    log.info("codebook: %d steps, %d dead codes restarted", opts.steps, restarted)
    return restarted


def _finetune_decoder(
    model: Tokenizer, cache: LatentCache, opts: RetrainOptions, generator: torch.Generator, progress: bool | None
) -> None:
    """L1 fine-tuning of the decoder on random crops of the cached latent grids and their pixels, the
    codes fixed (the quantizer's output of the cached latents)."""
    assert cache.images is not None
    f = model.downsample
    h = cache.grids.shape[2]
    crop = min(h, max(8, (opts.decoder_crop // f) if opts.decoder_crop else h // 2))
    steps = opts.decoder_steps or opts.steps
    model.requires_grad_(False)
    model.decoder.requires_grad_(True)
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=opts.decoder_lr)
    model.eval()
    model.decoder.train()
    n = len(cache.grids)
    with progress_bar(steps, f"codebook: fine-tune decoder ({crop * f}² crops)", "step", progress) as bar:
        for step in range(steps):
            pick = torch.randint(n, (min(opts.batch_size, n),), generator=generator)
            i, j = (int(v) for v in torch.randint(h - crop + 1, (2,), generator=generator))
            z = cache.grids[pick.to(cache.grids.device), :, i : i + crop, j : j + crop]
            x = to_float(cache.images[pick.to(cache.images.device), :, i * f : (i + crop) * f, j * f : (j + crop) * f])
            with torch.no_grad():
                codes = model.quantizer(z).quantized
            loss = F.l1_loss(model.decoder(codes), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
            if not bar.disable and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.eval()
    model.requires_grad_(True)
