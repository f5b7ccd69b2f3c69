"""The trainer: AdamW + warmup/cosine, gradient clipping, bf16 autocast on CUDA, EMA, DDP through
torchrun, atomic checkpoints with exact resume, a wall-clock budget per call, and a model
directory (from the EMA weights) as the final artefact.

Run directory layout::

    run/train_config.json   the validated config of the run
    run/metrics.jsonl       one JSON record per log/eval step (train and val scalars)
    run/tb/                 TensorBoard events (when tensorboard is installed)
    run/images/             reconstruction grids and code-usage histograms (PNG)
    run/checkpoints/        step_XXXXXXXX.pt, the last k
    run/model/              the final model directory (config.json + model.safetensors)
    run/summary.json        where the last call stopped and why
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from models import Tokenizer
from models.quantizers.functional import perplexity_from_counts, usage_from_counts

from .checkpointing import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import CONFIG_NAME, TrainConfig
from .data import Augment, DataError, ImageDataset, StreamSampler, collate_skip, iter_images, open_source, to_float, to_uint8
from .ema import EMA
from .losses import EfficientNetFeatureLoss, PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss, reconstruction_loss
from .metrics import psnr
from .runlog import RunLog, reconstruction_grid, usage_histogram

log = logging.getLogger(__name__)

MODEL_DIR = "model"


@dataclass
class TrainResult:
    step: int
    finished: bool  # reached max_steps (False: stopped by the time budget or stop_at_step)
    stop_reason: str
    model_dir: Path | None
    elapsed_s: float  # training time of this call
    images_per_s: float  # mean training throughput of this call (all processes)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return info


def resolve_device(name: str, dist_info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist_info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: str | Path, resume: bool = False) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.dist = init_distributed()
        self.device = resolve_device(config.device, self.dist)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed training shapes: search the conv algorithms once
        seed_everything(config.seed + self.dist.rank)
        self.amp_dtype = self._amp_dtype()

        self.model = self._build_model().to(self.device)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)  # type: ignore[call-overload]  # missing from the nn.Module stubs
        self.fwd: nn.Module = self.model
        if config.compile:
            self.fwd = torch.compile(self.model)  # type: ignore[assignment]
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.fwd = nn.parallel.DistributedDataParallel(self.fwd, device_ids=ids)
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=config.optim.lr,
            betas=config.optim.betas,
            weight_decay=config.optim.weight_decay,
        )
        o = config.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, o.warmup_steps, config.max_steps, o.min_lr_ratio)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.disc, self.disc_opt = self._build_discriminator()
        self.feature_loss = EfficientNetFeatureLoss().to(self.device) if config.loss.perceptual_weight > 0 else None

        self.step = 0
        # Global sample-stream positions consumed so far (all ranks): where the data resumes. Not
        # step·batch·world: a batch whose images were all unreadable consumes positions but no step.
        self.data_position = 0
        self.skipped_images = 0
        self.train_seconds = 0.0  # training time over all calls
        self.runlog = RunLog(self.run_dir, enabled=self.dist.main)
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.run_dir / CONFIG_NAME)
        if resume:
            self._resume()
        self.train_source = open_source(config.data.train, config.data.image_column)
        self.val_images = self._load_val() if self.dist.main else None

    # --- construction ---

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.config.amp
        if amp == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]

    def _build_model(self) -> Tokenizer:
        if self.config.model.init_from:
            return Tokenizer.from_pretrained(self.config.model.init_from)
        return Tokenizer(self.config.tokenizer_config())

    @property
    def resolution(self) -> int:
        return self.config.data.resolution or self.model.config.resolution

    def _build_discriminator(self) -> tuple[nn.Module | None, torch.optim.Optimizer | None]:
        lc = self.config.loss
        if not lc.adversarial:
            return None, None
        disc: nn.Module = PatchDiscriminator(lc.disc_channels, lc.disc_layers).to(self.device)
        opt = torch.optim.AdamW(disc.parameters(), lr=lc.disc_lr, betas=(0.5, 0.9))
        if self.dist.world > 1:
            disc = nn.parallel.DistributedDataParallel(disc, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return disc, opt

    def _loader(self) -> Iterator[tuple[Tensor, int]]:
        dc = self.config.data
        augment = Augment(self.resolution, dc.augment, dc.flip)
        dataset = ImageDataset(self.train_source, augment, seed=self.config.seed, cache_in_memory=dc.cache_in_memory)
        # the whole data-loader state: each batch takes batch_size positions per rank, interleaved
        sampler = StreamSampler(len(dataset), self.config.seed, self.dist.rank, self.dist.world, self.data_position)
        workers = 0 if dc.cache_in_memory else dc.num_workers
        loader = DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_skip,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )
        return iter(loader)

    def _load_val(self) -> Tensor | None:
        dc = self.config.data
        if not dc.val:
            return None
        augment = Augment(self.resolution, "center_crop", flip=False)
        rng = np.random.default_rng(0)
        images = [
            torch.from_numpy(augment(img, rng)).permute(2, 0, 1)
            for _, img in iter_images(dc.val, dc.val_limit, dc.image_column)
            if img is not None
        ]
        return torch.stack(images) if images else None

    # --- checkpoints ---

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step": self.step,
            "samples_seen": self.data_position,
            "data_position": self.data_position,
            "skipped_images": self.skipped_images,
            "train_seconds": self.train_seconds,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "config": self.config.to_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.disc is not None and self.disc_opt is not None:
            state["disc"] = _unwrap(self.disc).state_dict()
            state["disc_opt"] = self.disc_opt.state_dict()
        return state

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            log.warning("--resume: no checkpoint in %s, starting from step 0", self.run_dir)
            return
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        if self.disc is not None and self.disc_opt is not None and "disc" in state:
            _unwrap(self.disc).load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
        self.step = int(state["step"])
        # checkpoints older than the key: every batch was a step (exact unless a batch was all unreadable)
        self.data_position = int(state.get("data_position", self.step * self.config.batch_size * self.dist.world))
        self.skipped_images = int(state["skipped_images"])
        self.train_seconds = float(state["train_seconds"])
        if self.dist.world == 1:
            set_rng_state(state["rng"])  # per-rank streams differ under DDP; reseed from the step instead
        else:
            seed_everything(self.config.seed + self.dist.rank + 1_000_003 * self.step)
        log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> None:
        if self.dist.main:
            save_checkpoint(self.state_dict(), self.run_dir, self.step, self.config.keep_checkpoints)
        self._barrier()

    def export(self) -> Path | None:
        """Write the model directory from the EMA weights (the raw weights if the EMA is off)."""
        if not self.dist.main:
            return None
        return self.eval_model.save_pretrained(self.run_dir / MODEL_DIR)

    @property
    def eval_model(self) -> Tokenizer:
        """The EMA model when there is one: what validation measures and what is exported."""
        return cast(Tokenizer, self.ema.model) if self.ema is not None else self.model

    # --- the training step ---

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _adversarial_on(self) -> bool:
        return self.disc is not None and self.step >= self.config.loss.adversarial_start_step

    def train_step(self, images: Tensor) -> dict[str, Any]:
        lc = self.config.loss
        x = to_float(images.to(self.device, non_blocking=True)).contiguous(memory_format=self.memory_format)
        self.fwd.train()
        with self._autocast():
            out = self.fwd(x)
            rec = out.reconstruction.float()
            rec_loss = reconstruction_loss(rec, x, lc.recon)
            nll = lc.recon_weight * rec_loss
            feat_loss = self.feature_loss(rec, x) if self.feature_loss is not None else None
            if feat_loss is not None:
                nll = nll + lc.perceptual_weight * feat_loss
            loss = nll + lc.quantizer_weight * out.quantizer.loss.float()
            g_loss, g_weight = None, 0.0
            if self._adversarial_on():
                assert self.disc is not None
                g_loss = generator_loss(self.disc(rec).float())
                weight = lc.adversarial_weight
                if lc.adaptive_weight:
                    weight = weight * float(adaptive_weight(nll, g_loss, self.model.decoder.conv_out.weight))
                g_weight = weight
                loss = loss + weight * g_loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = float("nan")
        if self.config.optim.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        stats: dict[str, Any] = {
            "loss": float(loss.detach()),
            "recon_loss": float(rec_loss.detach()),
            "quantizer_loss": float(out.quantizer.loss.detach()),
            "grad_norm": grad_norm,
            "counts": out.quantizer.counts.detach(),
        }
        if feat_loss is not None:
            stats["feature_loss"] = float(feat_loss.detach())
        if g_loss is not None:
            stats["g_loss"], stats["g_weight"] = float(g_loss.detach()), g_weight
            stats["d_loss"] = self._discriminator_step(x, rec.detach())
        return stats

    def _discriminator_step(self, real: Tensor, fake: Tensor) -> float:
        assert self.disc is not None and self.disc_opt is not None
        with self._autocast():
            d_loss = hinge_d_loss(self.disc(real).float(), self.disc(fake).float())
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.disc_opt.step()
        return float(d_loss.detach())

    # --- evaluation during training ---

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """PSNR and whole-set codebook usage of the EMA model on the validation images."""
        if self.val_images is None:
            return {}
        model = self.eval_model.eval()
        counts = torch.zeros(model.codebook_size, dtype=torch.long, device=self.device)
        psnrs, losses = [], []
        for chunk in self.val_images.split(self.config.batch_size):
            x = to_float(chunk.to(self.device))
            with self._autocast():
                out = model(x)
            rec = out.reconstruction.float()
            losses.append(float(reconstruction_loss(rec, x, self.config.loss.recon)) * len(chunk))
            psnrs.append(psnr(chunk.to(self.device), to_uint8(rec.clamp(-1, 1))).cpu())
            counts += out.quantizer.counts
        self._last_val_counts = counts.cpu()
        n = len(self.val_images)
        return {
            "psnr": float(torch.cat(psnrs).clamp(max=100).mean()),
            "recon_loss": sum(losses) / n,
            "usage": usage_from_counts(counts),
            "perplexity": perplexity_from_counts(counts),
            "images": n,
        }

    @torch.no_grad()
    def write_images(self) -> None:
        if not self.dist.main or self.val_images is None:
            return
        model = self.eval_model.eval()
        x = self.val_images[:8]
        rec = model(to_float(x.to(self.device))).reconstruction.clamp(-1, 1)
        self.runlog.image(self.step, "reconstructions", reconstruction_grid(x, to_uint8(rec).cpu()))
        counts = getattr(self, "_last_val_counts", None)
        if counts is not None:
            self.runlog.image(self.step, "code_usage_sorted", usage_histogram(counts))

    # --- the loop ---

    def _barrier(self) -> None:
        if self.dist.world > 1:
            dist.barrier()

    def _agree(self, stop: bool, batch_images: int) -> tuple[bool, int]:
        """One collective per iteration, before the forward: (stop on any rank, fewest images in the
        local batch of any rank). All ranks then stop, skip or train together: a rank never enters
        DDP's backward all-reduce while another waits in a different collective."""
        if self.dist.world == 1:
            return stop, batch_images
        t = torch.tensor([1.0 if stop else 0.0, -float(batch_images)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flags = t.tolist()
        return flags[0] > 0, int(-flags[1])

    def _reduce_window(self, sums: dict[str, float], n: int, counts: Tensor, skipped: int) -> tuple[dict[str, float], Tensor, int]:
        if self.dist.world == 1:
            return {k: v / max(1, n) for k, v in sums.items()}, counts, skipped
        keys = sorted(sums)
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor([sums[k] for k in keys] + [float(n), float(skipped)], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        c = counts.to(dev)
        dist.all_reduce(c)
        total_n = max(1.0, float(t[-2]))
        return {k: float(t[i]) / total_n for i, k in enumerate(keys)}, c, int(t[-1])

    def train(self, stop_at_step: int | None = None) -> TrainResult:
        """Train until max_steps, the time budget, or `stop_at_step` (tests: a simulated kill)."""
        c = self.config
        budget_s = c.time_budget_minutes * 60 if c.time_budget_minutes > 0 else math.inf
        start = time.monotonic()
        batches = self._loader()
        bar = self._progress_bar()
        window: dict[str, float] = {}
        window_n, window_images, window_skipped = 0, 0, 0
        window_counts = torch.zeros(self.model.codebook_size, dtype=torch.long)
        window_start, images_total = time.monotonic(), 0
        reason, saved_at = "max_steps", -1
        positions_per_batch = c.batch_size * self.dist.world
        empty_run = 0  # stream positions consumed since the last trained step
        while self.step < c.max_steps:
            if stop_at_step is not None and self.step >= stop_at_step:
                reason = "stop_at_step"
                break
            images, skipped = next(batches)
            stop, fewest = self._agree(time.monotonic() - start >= budget_s, images.shape[0])
            if stop:  # this batch is not consumed: a resumed run starts with it
                reason = "time_budget"
                break
            self.data_position += positions_per_batch
            self.skipped_images += skipped
            window_skipped += skipped
            if fewest == 0:
                # Every image of some rank's batch was unreadable: all ranks skip it together (no
                # step, so no DDP collective); the positions are consumed all the same.
                empty_run += positions_per_batch
                if empty_run > len(self.train_source) + positions_per_batch:
                    raise DataError(f"no readable image in a whole pass over {c.data.train}")
                continue
            empty_run = 0
            stats = self.train_step(images)
            self.step += 1
            window_counts += stats.pop("counts").cpu()
            for k, v in stats.items():
                window[k] = window.get(k, 0.0) + v
            window_n += 1
            window_images += images.shape[0]
            images_total += images.shape[0]
            if bar is not None:
                bar.update(1)
            if self.step % c.log_every == 0 or self.step == c.max_steps:
                elapsed = time.monotonic() - window_start
                self._log_train(window, window_n, window_counts, window_skipped, window_images * self.dist.world / max(elapsed, 1e-9), bar)
                window, window_n, window_images, window_skipped = {}, 0, 0, 0
                window_counts.zero_()
                window_start = time.monotonic()
            if self.dist.main and (self.step % c.eval_every == 0 or self.step == c.max_steps):
                self.runlog.scalars(self.step, "val", self.validate())
            if self.step % c.image_every == 0 or self.step == c.max_steps:
                self.write_images()
            if self.step % c.checkpoint_every == 0:
                self.save()
                saved_at = self.step
        call_seconds = time.monotonic() - start
        self.train_seconds += call_seconds
        if saved_at != self.step:
            self.save()
        if bar is not None:
            bar.close()
        model_dir = self.export()
        result = TrainResult(
            self.step, self.step >= c.max_steps, reason, model_dir, call_seconds, images_total * self.dist.world / max(call_seconds, 1e-9)
        )
        self._write_summary(result)
        self.runlog.close()
        self._barrier()
        return result

    def _progress_bar(self) -> Any:
        if not (self.dist.main and self.config.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.max_steps, initial=self.step, desc="train", dynamic_ncols=True)

    def _log_train(self, window: dict[str, float], n: int, counts: Tensor, skipped: int, images_per_s: float, bar: Any) -> None:
        means, counts, skipped = self._reduce_window(window, n, counts, skipped)
        if not self.dist.main:
            return
        values = {
            **means,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "images_per_s": images_per_s,
            "window_usage": usage_from_counts(counts),  # codes used in the last log_every steps ÷ K
            "window_perplexity": perplexity_from_counts(counts),
            "skipped_images": float(self.skipped_images),
        }
        self.runlog.scalars(self.step, "train", values)
        if bar is not None:
            bar.set_postfix(
                loss=f"{means.get('loss', float('nan')):.4f}", img_s=f"{images_per_s:.0f}", usage=f"{values['window_usage']:.3f}"
            )

    def _write_summary(self, result: TrainResult) -> None:
        if not self.dist.main:
            return
        summary = {
            "step": result.step,
            "max_steps": self.config.max_steps,
            "finished": result.finished,
            "stop_reason": result.stop_reason,
            "call_seconds": round(result.elapsed_s, 2),
            "train_seconds_total": round(self.train_seconds, 2),
            "images_per_s": round(result.images_per_s, 2),
            "world_size": self.dist.world,
            "device": str(self.device),
            "skipped_images": self.skipped_images,
            "model_dir": str(result.model_dir) if result.model_dir else None,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
