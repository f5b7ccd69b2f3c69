"""The trainer: AdamW + warmup/cosine, gradient clipping, bf16 autocast on CUDA, EMA, DDP through
torchrun, atomic checkpoints with exact resume, a wall-clock budget per call, and a model
directory (from the EMA weights) as the final artefact.

The loss (`LossSection`): pixel L1/L2, LPIPS (frozen, float32 even under autocast), the quantizer's
loss and, from `gan_start_step` on, a PatchGAN hinge loss weighted by VQGAN's adaptive weight at the
decoder's last layer; the discriminator has its own optimizer, gradient scaler and DDP wrapper, and
is checkpointed with the rest. Each process sets its own CPU thread budget (`cpu_threads`).

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
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from models.config import ConfigError
from models.quantizers.functional import perplexity_from_counts, usage_from_counts
from models.tokenizer import Tokenizer

from .checkpointing import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import CONFIG_NAME, MODEL_PARTS, TrainConfig, TrainConfigError
from .data import (
    Augment,
    DataError,
    ImageDataset,
    MixtureSampler,
    StreamSampler,
    collate_skip,
    iter_images,
    open_train_sources,
    to_float,
    to_uint8,
    worker_init,
)
from .ema import EMA
from .losses import PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss, l1_loss, l2_loss, last_layer_grads
from .lpips import LPIPS
from .metrics import psnr
from .runlog import RunLog, reconstruction_grid, usage_histogram
from .warmstart import check_growable, grow_into

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


def cpu_thread_budget(setting: int, device_type: str, environ: Mapping[str, str] | None = None) -> int | None:
    """Threads for torch's intra-op pool in one training process (`TrainConfig.cpu_threads`), or
    None to keep torch's own choice. The rule: an explicit setting > 0; else OMP_NUM_THREADS when set
    (torchrun sets 1 per process); else 1 on CUDA, where the CPU only decodes, crops and launches
    kernels, and torch's every-core pool makes those threads fight the loader workers for the cores
    (on a many-core host it more than halves a single-GPU run's images/s); else None: a CPU-only run
    keeps torch's default, every physical core."""
    if setting > 0:
        return setting
    omp = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return 1 if device_type == "cuda" else None


class _EagerLastLayer(nn.Conv2d):
    """The decoder's last conv, kept out of torch.compile's graph (a graph break before it): the
    adaptive weight's two gradients at its weight then cost one small conv backward each, where
    through a compiled graph each would run the whole model's backward."""

    @torch.compiler.disable
    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input)


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
        self.cpu_threads = cpu_thread_budget(config.cpu_threads, self.device.type)
        if self.cpu_threads is not None and self.cpu_threads != torch.get_num_threads():
            torch.set_num_threads(self.cpu_threads)
        log.info("CPU threads per process: %d", torch.get_num_threads())
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed training shapes: search the conv algorithms once
        seed_everything(config.seed + self.dist.rank)
        self.amp_dtype = self._amp_dtype()
        lc = config.loss

        self.model = self._build_model().to(self.device)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)  # type: ignore[call-overload]  # missing from the nn.Module stubs
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.fwd: nn.Module = self.model
        if config.compile:
            if lc.gan_weight > 0 and lc.gan_adaptive:
                self.model.decoder.conv_out.__class__ = _EagerLastLayer  # same parameters, same state_dict
            self.fwd = torch.compile(self.model)  # type: ignore[assignment]
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.fwd = nn.parallel.DistributedDataParallel(self.fwd, device_ids=ids)
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
        self.disc_scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.lpips: LPIPS | None = None
        if lc.lpips_weight > 0:  # the official v0.1 weights from the local cache (LPIPSWeightsMissing says how to fetch)
            lpips = LPIPS.load(lc.lpips_net).to(self.device)
            self.lpips = lpips.to(memory_format=self.memory_format)  # type: ignore[call-overload]

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
        self.train_source, self.train_weights = open_train_sources(
            config.data.train_paths(), config.data.train_weights, config.data.image_column
        )
        self.val_images = self._load_val() if self.dist.main else None

    # --- construction ---

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.config.amp
        if amp == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]

    def _build_model(self) -> Tokenizer:
        mc = self.config.model
        if not mc.init_from:
            return Tokenizer(self.config.tokenizer_config())
        source = Tokenizer.from_pretrained(mc.init_from)
        if mc.init_grow:
            target = self.config.tokenizer_config()
            try:
                check_growable(source.config, target)
            except ValueError as exc:
                raise TrainConfigError(f"model.init_grow from {mc.init_from}: {exc}") from exc
            model = Tokenizer(target)
            report = grow_into(model, source)
            log.info("grown from %s: %s", mc.init_from, report)
            return model
        if mc.init_parts:  # init_from's network with the overrides, only the named parts' weights from it
            try:
                model = Tokenizer(source.config.replace(**mc.overrides))
            except ConfigError as exc:
                raise TrainConfigError(f"invalid config value for 'model.overrides': {exc}") from exc
            for part in mc.init_parts:
                try:
                    getattr(model, part).load_state_dict(getattr(source, part).state_dict())
                except RuntimeError as exc:  # shapes differ: the overrides changed this part
                    raise TrainConfigError(f"model.init_parts: {part} of {mc.init_from} does not fit the new network: {exc}") from exc
            log.info(
                "from %s: %s (fresh: %s)",
                mc.init_from,
                ", ".join(mc.init_parts),
                ", ".join(p for p in MODEL_PARTS if p not in mc.init_parts) or "-",
            )
        else:
            model = source
        for part in mc.freeze:
            getattr(model, part).requires_grad_(False)
        if mc.freeze:
            log.info("frozen: %s", ", ".join(mc.freeze))
        return model

    @property
    def resolution(self) -> int:
        return self.config.data.resolution or self.model.config.resolution

    def _build_discriminator(self) -> tuple[nn.Module | None, torch.optim.Optimizer | None]:
        """The PatchGAN, its own AdamW (constant LR, no weight decay) and, under DDP, its own wrapper."""
        lc = self.config.loss
        if lc.gan_weight <= 0:
            return None, None
        disc: nn.Module = PatchDiscriminator(lc.disc_channels, lc.disc_layers).to(self.device)
        disc = disc.to(memory_format=self.memory_format)  # type: ignore[call-overload]
        opt = torch.optim.AdamW(disc.parameters(), lr=lc.disc_lr, betas=lc.disc_betas, weight_decay=0.0)
        if self.dist.world > 1:
            disc = nn.parallel.DistributedDataParallel(disc, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return disc, opt

    def _loader(self) -> Iterator[tuple[Tensor, int]]:
        dc = self.config.data
        augment = Augment(self.resolution, dc.augment, dc.flip)
        dataset = ImageDataset(self.train_source, augment, seed=self.config.seed, cache_in_memory=dc.cache_in_memory)
        # the whole data-loader state: each batch takes batch_size positions per rank, interleaved
        sampler: StreamSampler | MixtureSampler
        if self.train_weights is None:
            sampler = StreamSampler(len(dataset), self.config.seed, self.dist.rank, self.dist.world, self.data_position)
        else:
            sampler = MixtureSampler(
                self.train_source.sizes, self.train_weights, self.config.seed, self.dist.rank, self.dist.world, self.data_position
            )
        # workers crop (and decode, without the cache) off the main thread; with the cache they read
        # the decoded arrays the main process holds (fork shares them)
        workers = dc.num_workers
        loader = DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_skip,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=worker_init if workers > 0 else None,
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
            state["disc_scaler"] = self.disc_scaler.state_dict()
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
            if "disc_scaler" in state:
                self.disc_scaler.load_state_dict(state["disc_scaler"])
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

    def _lpips_on(self) -> bool:
        return self.lpips is not None and self.step >= self.config.loss.lpips_start_step

    def _gan_on(self) -> bool:
        return self.disc is not None and self.step >= self.config.loss.gan_start_step

    def perceptual(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean LPIPS distance, computed in float32 with autocast off (it is a frozen metric network;
        bf16 activations would change the loss it reports and the gradient it gives)."""
        assert self.lpips is not None
        with torch.autocast(self.device.type, enabled=False):
            return self.lpips(x.float(), y.float()).mean()

    def train_step(self, images: Tensor) -> dict[str, Tensor]:
        """One optimizer step of the tokenizer (and, once the GAN is on, of the discriminator).

        The generator's losses are computed on a detached copy r of the reconstruction x̂ and
        differentiated there first: g = ∂L_rec/∂r, plus w·∂L_G/∂r with w = gan_weight·λ. The model
        then backpropagates ⟨x̂, g⟩ + quantizer_weight·L_q, whose parameter gradient is that of
        L_rec + quantizer_weight·L_q + w·L_G: LPIPS and the discriminator are differentiated once.
        Returns 0-dim tensors (no host sync here) and the code counts."""
        lc = self.config.loss
        x = to_float(images.to(self.device, non_blocking=True)).contiguous(memory_format=self.memory_format)
        self.fwd.train()
        with self._autocast():
            out = self.fwd(x)
        rec = out.reconstruction.float()
        q_loss = out.quantizer.loss.float()
        r = rec.detach().requires_grad_(True)
        l1, l2 = l1_loss(r, x), l2_loss(r, x)
        rec_loss = lc.l1_weight * l1 + lc.l2_weight * l2
        stats: dict[str, Tensor] = {
            "l1": l1.detach(),
            "l2": l2.detach(),
            "recon_loss": rec_loss.detach(),
            "quantizer_loss": q_loss.detach(),
        }
        if self._lpips_on():
            lp = self.perceptual(r, x)
            rec_loss = rec_loss + lc.lpips_weight * lp
            stats["lpips"] = lp.detach()
        grad = torch.autograd.grad(rec_loss, r)[0]
        loss = rec_loss.detach() + lc.quantizer_weight * q_loss.detach()
        if self._gan_on():
            assert self.disc is not None
            with self._autocast():  # the module, not its DDP wrapper: only r gets a gradient here
                g_loss = generator_loss(_unwrap(self.disc)(r).float())
            g_grad = torch.autograd.grad(g_loss, r)[0]
            weight = torch.full((), lc.gan_weight, device=self.device)
            if lc.gan_adaptive:
                rec_w, gan_w = last_layer_grads(rec, self.model.decoder.conv_out.weight, grad, g_grad)
                lam = adaptive_weight(rec_w, gan_w, lc.gan_max_weight)
                weight = weight * lam
                stats["adaptive_weight"] = lam
            grad = grad + weight * g_grad
            loss = loss + weight * g_loss.detach()
            stats["g_loss"], stats["g_weight"] = g_loss.detach(), weight
        stats["loss"] = loss
        surrogate = (rec * grad).sum() + lc.quantizer_weight * q_loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(surrogate).backward()
        self.scaler.unscale_(self.optimizer)
        if self.config.optim.grad_clip > 0:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip).detach()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if self._gan_on():
            stats.update(self._discriminator_step(x, rec.detach()))
        stats["counts"] = out.quantizer.counts.detach()
        return stats

    def _discriminator_step(self, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """One step of the hinge loss ½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))]); real and fake go
        through the (DDP-wrapped) discriminator as one batch: one forward, one backward."""
        assert self.disc is not None and self.disc_opt is not None
        with self._autocast():
            logits = self.disc(torch.cat([real, fake])).float()
        logits_real, logits_fake = logits.chunk(2)
        d_loss = hinge_d_loss(logits_real, logits_fake)
        self.disc_opt.zero_grad(set_to_none=True)
        self.disc_scaler.scale(d_loss).backward()
        self.disc_scaler.step(self.disc_opt)
        self.disc_scaler.update()
        return {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}

    # --- evaluation during training ---

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """PSNR and whole-set codebook usage of the EMA model on the validation images."""
        if self.val_images is None:
            return {}
        lc = self.config.loss
        model = self.eval_model.eval()
        counts = torch.zeros(model.codebook_size, dtype=torch.long, device=self.device)
        psnrs: list[Tensor] = []
        sums = {"l1": 0.0, "l2": 0.0, "lpips": 0.0}
        for chunk in self.val_images.split(self.config.batch_size):
            x = to_float(chunk.to(self.device))
            with self._autocast():
                out = model(x)
            rec = out.reconstruction.float()
            sums["l1"] += float(l1_loss(rec, x)) * len(chunk)
            sums["l2"] += float(l2_loss(rec, x)) * len(chunk)
            if self.lpips is not None:
                sums["lpips"] += float(self.perceptual(rec, x)) * len(chunk)
            psnrs.append(psnr(chunk.to(self.device), to_uint8(rec.clamp(-1, 1))).cpu())
            counts += out.quantizer.counts
        self._last_val_counts = counts.cpu()
        n = len(self.val_images)
        values = {
            "psnr": float(torch.cat(psnrs).clamp(max=100).mean()),
            "l1": sums["l1"] / n,
            "l2": sums["l2"] / n,
            "recon_loss": (lc.l1_weight * sums["l1"] + lc.l2_weight * sums["l2"]) / n,
            "usage": usage_from_counts(counts),
            "perplexity": perplexity_from_counts(counts),
            "images": n,
        }
        if self.lpips is not None:
            values[f"lpips_{lc.lpips_net}"] = sums["lpips"] / n
        return values

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

    def _reduce_window(
        self, sums: dict[str, Tensor], steps: dict[str, int], counts: Tensor, skipped: int
    ) -> tuple[dict[str, float], Tensor, int]:
        """Means over the window's steps (each key over the steps that had it, e.g. the GAN's from
        its start) and all ranks; the one host sync of the window."""
        keys = sorted(sums)
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.stack([sums[k].to(dev, torch.float64) for k in keys] + [torch.tensor(float(skipped), dtype=torch.float64, device=dev)])
        n = torch.tensor([float(steps[k]) for k in keys], dtype=torch.float64, device=dev)
        c = counts.to(dev)
        if self.dist.world > 1:
            dist.all_reduce(t)
            dist.all_reduce(n)
            dist.all_reduce(c)
        values, totals = t.tolist(), n.tolist()
        return {k: values[i] / max(1.0, totals[i]) for i, k in enumerate(keys)}, c, int(values[-1])

    def train(self, stop_at_step: int | None = None) -> TrainResult:
        """Train until max_steps, the time budget, or `stop_at_step` (tests: a simulated kill)."""
        c = self.config
        terminated = _Termination()  # first: a SIGTERM from here on stops the run cleanly
        budget_s = c.time_budget_minutes * 60 if c.time_budget_minutes > 0 else math.inf
        start = time.monotonic()
        batches = self._loader()
        bar = self._progress_bar()
        window: dict[str, Tensor] = {}  # sums of the step stats since the last log, on the device
        window_steps: dict[str, int] = {}
        window_images, window_skipped = 0, 0
        window_counts = torch.zeros(self.model.codebook_size, dtype=torch.long, device=self.device)
        window_start, images_total = time.monotonic(), 0
        reason, saved_at = "max_steps", -1
        positions_per_batch = c.batch_size * self.dist.world
        empty_run = 0  # stream positions consumed since the last trained step
        while self.step < c.max_steps:
            if stop_at_step is not None and self.step >= stop_at_step:
                reason = "stop_at_step"
                break
            images, skipped = next(batches)
            over_budget = time.monotonic() - start >= budget_s
            stop, fewest = self._agree(over_budget or terminated.is_set(), images.shape[0])
            if stop:  # this batch is not consumed: a resumed run starts with it
                reason = "time_budget" if over_budget else "terminated"
                break
            self.data_position += positions_per_batch
            self.skipped_images += skipped
            window_skipped += skipped
            if fewest == 0:
                # Every image of some rank's batch was unreadable: all ranks skip it together (no
                # step, so no DDP collective); the positions are consumed all the same.
                empty_run += positions_per_batch
                if empty_run > len(self.train_source) + positions_per_batch:
                    raise DataError(f"no readable image in a whole pass over {', '.join(c.data.train_paths())}")
                continue
            empty_run = 0
            stats = self.train_step(images)
            self.step += 1
            window_counts += stats.pop("counts")
            for k, v in stats.items():
                window[k] = window[k] + v if k in window else v.clone()
                window_steps[k] = window_steps.get(k, 0) + 1
            window_images += images.shape[0]
            images_total += images.shape[0]
            if bar is not None:
                bar.update(1)
            if self.step % c.log_every == 0 or self.step == c.max_steps:
                elapsed = time.monotonic() - window_start
                self._log_train(
                    window, window_steps, window_counts, window_skipped, window_images * self.dist.world / max(elapsed, 1e-9), bar
                )
                window, window_steps, window_images, window_skipped = {}, {}, 0, 0
                window_counts.zero_()
                window_start = time.monotonic()
            if self.dist.main and (self.step % c.eval_every == 0 or self.step == c.max_steps):
                self.runlog.scalars(self.step, "val", self.validate())
            if self.step % c.image_every == 0 or self.step == c.max_steps:
                self.write_images()
            if self.step % c.checkpoint_every == 0:
                self.save()
                saved_at = self.step
        terminated.restore()
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

        # disable=None: a bar only when stderr is a terminal (logs and CI stay clean)
        return tqdm(total=self.config.max_steps, initial=self.step, desc="train", dynamic_ncols=True, disable=None)

    def _log_train(
        self, window: dict[str, Tensor], steps: dict[str, int], counts: Tensor, skipped: int, images_per_s: float, bar: Any
    ) -> None:
        means, counts, skipped = self._reduce_window(window, steps, counts, skipped)
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


class _Termination:
    """SIGTERM asks the run to stop as the time budget does: after the current step, with a checkpoint and
    the exported model (a scheduler's pre-emption, or a script ending a detached run, loses nothing)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: Any = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._event.set())

    def is_set(self) -> bool:
        return self._event.is_set()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
