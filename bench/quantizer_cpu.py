"""How fast are this repository's quantizers against vector-quantize-pytorch (forward + backward, K = 65,536, CPU)?

Same input (B·H·W latent vectors of D channels), same K, same run; each row is the median time of
one forward + backward, and the ratio vq-pytorch time ÷ vqtok time (> 1: vqtok is faster).

  python -m bench.quantizer_cpu --out bench/results/quantizer_speed/cpu-2026-11-22/quantizer_cpu.json

Committed runs: bench/results/quantizer_speed/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from vector_quantize_pytorch import SimVQ, VectorQuantize

from models.export.driver import git_revision
from models.quantizers import VectorQuantizer


def median_seconds(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_ours(q: torch.nn.Module, z: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        z.grad = None
        out = q(z)
        (out.quantized.square().mean() + out.loss).backward()

    return run


def step_peer(q: torch.nn.Module, z: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        z.grad = None
        quantized, _, loss = q(z)
        (quantized.square().mean() + loss.sum()).backward()

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codebook-size", type=int, default=65536)
    ap.add_argument("--dims", nargs="+", type=int, default=[8, 256])
    ap.add_argument("--tokens", type=int, default=1024, help="latent vectors per step (e.g. 4 images of 16×16 tokens)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    k, rows = args.codebook_size, []
    side = int(args.tokens**0.5)
    for d in args.dims:
        z = torch.randn(args.tokens // (side * side) or 1, d, side, side, requires_grad=True)
        pairs: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {
            "vq-rotation": (
                VectorQuantizer(d, k, gradient="rotation", linear_codebook=False),
                VectorQuantize(
                    dim=d,
                    codebook_size=k,
                    rotation_trick=True,
                    channel_last=False,
                    accept_image_fmap=True,
                    ema_update=False,
                    learnable_codebook=True,
                ),
            ),
            "simvq-rotation": (
                VectorQuantizer(d, k, gradient="rotation", linear_codebook=True),
                SimVQ(dim=d, codebook_size=k, rotation_trick=True, channel_first=True),
            ),
        }
        for name, (ours, peer) in pairs.items():
            t_ours = median_seconds(step_ours(ours, z), args.repeats)
            t_peer = median_seconds(step_peer(peer, z), args.repeats)
            row: dict[str, Any] = {
                "quantizer": name,
                "codebook_size": k,
                "dim": d,
                "tokens": z.shape[0] * side * side,
                "vqtok_ms": 1e3 * t_ours,
                "vq_pytorch_ms": 1e3 * t_peer,
                "speedup": t_peer / t_ours,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "revision": git_revision(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"\n{'quantizer':16s} {'K':>6s} {'D':>4s} {'tokens':>6s} {'vqtok ms':>9s} {'vq-pytorch ms':>13s} {'speedup':>7s}")
    for r in rows:
        print(
            f"{r['quantizer']:16s} {r['codebook_size']:6d} {r['dim']:4d} {r['tokens']:6d} {r['vqtok_ms']:9.1f} {r['vq_pytorch_ms']:13.1f} {r['speedup']:7.2f}"
        )


if __name__ == "__main__":
    main()
