"""CIFAR-10 quantizer comparison: does codebook usage collapse as K grows, and which estimators keep it up?

One network (the cifar presets' VQGAN-style encoder/decoder, f=4, an 8×8 token grid), one budget
(same steps, batch, learning rate and seed) for every variant:

  vq-ste, vq-rotation, simvq-ste, simvq-rotation, fsq           (this repository's quantizers)
  vqp-vq-rotation   vector_quantize_pytorch.VectorQuantize(rotation_trick=True), its defaults otherwise
  vqp-simvq         vector_quantize_pytorch.SimVQ (rotation trick on, its default)

at K = 1,024 and 65,536 (FSQ at its nearest level sets: [8,5,5,5] = 1,000 and [8,8,8,5,5,5] = 64,000).
Train on the 50,000 train images, measure on the 10,000 test images: codebook usage over the whole
test set (codes used at least once ÷ K), perplexity (exp entropy of the code frequencies) and PSNR.

The dataset is decoded once into a uint8 tensor on the device; bf16 autocast on CUDA (quantizers
search in float32); a per-run wall-clock guard (--time-per-run) stops a slow variant early and the
table says so. GPU: 14 runs × ~25 s ≈ 6–7 min on one H100. CPU smoke test:
    python -m bench.quantizers_cifar10 --steps 3 --batch-size 16 --limit 512 --test-limit 256 --codebook-sizes 64 --channels 16 --out /tmp/bench

Committed runs: bench/results/quantizers_cifar10/
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from bench.harness.record import REPO
from models.presets import preset_config
from models.quantizers import QuantizerOutput
from models.quantizers.functional import code_counts, perplexity_from_counts, usage_from_counts
from models.tokenizer import Tokenizer

DATA = REPO.parent / "shared" / "data" / "cifar10"
OURS = ("vq-ste", "vq-rotation", "simvq-ste", "simvq-rotation", "fsq")
PEERS = ("vqp-vq-rotation", "vqp-simvq")
# FSQ paper (arXiv 2309.15505, Table 1) level sets, by the K they stand in for.
FSQ_LEVELS = {2**8: [8, 6, 5], 2**10: [8, 5, 5, 5], 2**12: [7, 5, 5, 5, 5], 2**14: [8, 8, 8, 6, 5], 2**16: [8, 8, 8, 5, 5, 5]}


# --- data ---


def load_split(files: list[Path], limit: int, threads: int) -> Tensor:
    """Parquet shards (HF image convention) -> uint8 (N, 3, 32, 32)."""
    import pyarrow.parquet as pq

    blobs: list[bytes] = []
    for f in files:
        blobs += [cell["bytes"] for cell in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
        if limit and len(blobs) >= limit:
            break
    blobs = blobs[:limit] if limit else blobs

    def decode(b: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(b)) as im:
            return np.array(im.convert("RGB"))

    with ThreadPoolExecutor(threads) as pool:
        arrays = list(pool.map(decode, blobs, chunksize=256))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_float(x: Tensor) -> Tensor:
    return x.float().div(127.5).sub(1)


def to_uint8(x: Tensor) -> Tensor:
    return x.float().add(1).mul(127.5).round().clamp(0, 255)


# --- peers from vector-quantize-pytorch, behind the same QuantizerOutput contract ---


class PeerQuantizer(nn.Module):
    """Wraps a vector_quantize_pytorch module: (B, D, H, W) latents -> QuantizerOutput."""

    def __init__(self, kind: str, dim: int, codebook_size: int) -> None:
        super().__init__()
        import vector_quantize_pytorch as vqp

        self.codebook_size = codebook_size
        if kind == "vqp-vq-rotation":
            self.inner: nn.Module = vqp.VectorQuantize(dim=dim, codebook_size=codebook_size, rotation_trick=True, accept_image_fmap=True)
        elif kind == "vqp-simvq":
            self.inner = vqp.SimVQ(dim=dim, codebook_size=codebook_size, channel_first=True)
        else:
            raise ValueError(kind)

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            quantized, indices, loss = self.inner(z.float())
        loss = loss.sum() if loss.numel() > 1 else loss.reshape(())
        return QuantizerOutput(quantized, indices, loss, loss.detach(), loss.detach(), code_counts(indices, self.codebook_size))


def build_model(variant: str, k: int, channels: int) -> tuple[Tokenizer, int]:
    """-> (model, effective K)."""
    net = dict(base_channels=channels, norm_groups=min(32, channels))
    if variant == "fsq":
        nearest = min(FSQ_LEVELS, key=lambda size: abs(math.log2(size) - math.log2(k)))
        cfg = preset_config("cifar-fsq", fsq_levels=tuple(FSQ_LEVELS[nearest]), codebook_size=0, latent_dim=0, **net)
        return Tokenizer(cfg), cfg.codebook_size
    gradient = "ste" if variant.endswith("-ste") else "rotation"
    linear = variant.startswith("simvq")
    cfg = preset_config("cifar-vq-rotation", codebook_size=k, gradient=gradient, linear_codebook=linear, **net)
    model = Tokenizer(cfg)
    if variant in PEERS:
        model.quantizer = PeerQuantizer(variant, cfg.latent_dim, k)  # type: ignore[assignment]
    return model, k


# --- one run ---


@torch.no_grad()
def measure(model: Tokenizer, test: Tensor, k: int, batch: int) -> dict[str, float]:
    model.eval()
    counts = torch.zeros(k, dtype=torch.long, device=test.device)
    psnrs = []
    for chunk in test.split(batch):
        with autocast(chunk.device):
            out = model(to_float(chunk))
        counts += out.quantizer.counts
        mse = (to_uint8(out.reconstruction.clamp(-1, 1)) - chunk.float()).pow(2).flatten(1).mean(1)
        psnrs.append(10 * torch.log10(255.0**2 / mse.clamp_min(1e-10)))
    return {
        "test_usage": usage_from_counts(counts),
        "test_perplexity": perplexity_from_counts(counts),
        "test_psnr": float(torch.cat(psnrs).mean()),
    }


def autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def run_one(variant: str, k: int, train: Tensor, test: Tensor, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    device = train.device
    model, k_eff = build_model(variant, k, args.channels)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    gen = torch.Generator(device=device).manual_seed(args.seed)
    start = time.monotonic()
    step, losses, last_counts = 0, [], torch.zeros(k_eff, dtype=torch.long, device=device)
    stopped_early = False
    model.train()
    while step < args.steps:
        if time.monotonic() - start > args.time_per_run:
            stopped_early = True
            break
        idx = torch.randint(len(train), (args.batch_size,), device=device, generator=gen)
        x = to_float(train[idx])
        flip = torch.rand(len(x), device=device, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        with autocast(device):
            out = model(x)
            loss = F.mse_loss(out.reconstruction.float(), x) + out.quantizer.loss.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 50 == 0 or step == args.steps:
            losses.append(float(loss.detach()))
        if args.steps - step < 10:
            last_counts += out.quantizer.counts
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.monotonic() - start
    result = {
        "variant": variant,
        "codebook_size": k_eff,
        "nominal_k": k,
        "steps": step,
        "stopped_early": stopped_early,
        "train_seconds": round(train_s, 2),
        "final_train_loss": losses[-1] if losses else float("nan"),
        "last_steps_batch_usage": usage_from_counts(last_counts),
    }
    result.update(measure(model, test, k_eff, args.eval_batch))
    if variant == "fsq":
        result["fsq_levels"] = list(model.quantizer.levels_list)  # type: ignore[union-attr]
    return result


# --- report ---


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"CIFAR-10 quantizers — {meta['device']}, {meta['steps']} steps × batch {meta['batch_size']}, lr {meta['lr']}, "
        f"channels {meta['channels']}, train {meta['train_images']} / test {meta['test_images']} images, rev {meta['git_rev']}",
        "",
        "| variant | K | steps | test usage | test perplexity | test PSNR (dB) | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['nominal_k']} | – | – | – | – | {r['error']} |")
            continue
        steps = f"{r['steps']}{' (guard)' if r['stopped_early'] else ''}"
        lines.append(
            f"| {r['variant']} | {r['codebook_size']:,} | {steps} | {100 * r['test_usage']:.1f}% | {r['test_perplexity']:.1f} | {r['test_psnr']:.2f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="folder with the CIFAR-10 parquet shards")
    p.add_argument("--out", type=Path, required=True, help="output folder for results.json and results.md")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--channels", type=int, default=64, help="base channels of the encoder/decoder")
    p.add_argument("--codebook-sizes", type=int, nargs="+", default=[1024, 65536])
    p.add_argument("--variants", nargs="+", default=[*OURS, *PEERS], choices=[*OURS, *PEERS])
    p.add_argument("--time-per-run", type=float, default=26.0, help="seconds; a run past it stops early (flagged)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N train images (0 = all 50,000)")
    p.add_argument("--test-limit", type=int, default=0, help="use only the first N test images (0 = all 10,000)")
    p.add_argument("--eval-batch", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=16, help="JPEG decoding threads")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    t0 = time.monotonic()
    train = load_split(sorted(args.data.glob("train-*.parquet")), args.limit, args.threads).to(device)
    test = load_split(sorted(args.data.glob("test-*.parquet")), args.test_limit, args.threads).to(device)
    log(f"decoded {len(train)} train / {len(test)} test images in {time.monotonic() - t0:.1f} s onto {device}")
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "git_rev": git_rev(),
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "channels": args.channels,
        "time_per_run_s": args.time_per_run,
        "train_images": len(train),
        "test_images": len(test),
        "seed": args.seed,
        "usage_definition": "codes used at least once over the whole test set ÷ K",
    }
    results: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every run, so a run cut short keeps what it measured
        meta["total_seconds"] = round(time.monotonic() - t0, 1)
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")

    for k in args.codebook_sizes:
        for variant in args.variants:
            try:
                r = run_one(variant, k, train, test, args)
            except ImportError as exc:  # vector-quantize-pytorch missing on this machine
                r = {"variant": variant, "nominal_k": k, "error": f"skipped: {exc}"}
            results.append(r)
            if "error" in r:
                log(f"{variant:16s} K={k:<6d} {r['error']}")
            else:
                log(
                    f"{variant:16s} K={r['codebook_size']:<6d} steps={r['steps']:<5d} usage={100 * r['test_usage']:6.2f}% "
                    f"ppl={r['test_perplexity']:9.1f} psnr={r['test_psnr']:6.2f} ({r['train_seconds']:.0f} s)"
                )
            write()
    write()
    table = markdown(results, meta)
    (args.out / "results.md").write_text(table)
    log(table)
    return results


if __name__ == "__main__":
    main()
