"""Which memory format / compile options make a preset's training step fastest?

Training-step throughput of a preset under memory-format / compile options, plus the top
CUDA kernels of the eager step. Used to choose how the default tokenizer is trained.

  python -m bench.train_step_profile --preset f8-simvq-16k --batch 32 --out prof.json

Committed runs: bench/results/training/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models.presets import create_tokenizer


def make_step(preset: str, batch: int, size: int, channels_last: bool, compile_: bool, device: str, overrides: dict):
    torch.manual_seed(0)
    model = create_tokenizer(preset, **overrides).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    fwd = torch.compile(model) if compile_ else model
    x = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=fmt)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = fwd(x)
            loss = (out.reconstruction.float() - x).abs().mean() + out.quantizer.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure(step, device: str, steps: int) -> float:
    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="f8-simvq-16k")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--overrides", default="{}", help="JSON config overrides (e.g. for a tiny CPU check)")
    ap.add_argument("--variants", nargs="+", default=["eager", "channels_last", "compile", "compile+channels_last"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    overrides = json.loads(args.overrides)
    rows = []
    for variant in args.variants:
        t_build = time.perf_counter()
        step = make_step(args.preset, args.batch, args.size, "channels_last" in variant, "compile" in variant, args.device, overrides)
        sec = measure(step, args.device, args.steps)
        rows.append(
            {
                "variant": variant,
                "step_s": sec,
                "images_per_s": args.batch / sec,
                "setup_s": time.perf_counter() - t_build - sec * args.steps,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if args.device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        step = make_step(args.preset, args.batch, args.size, False, False, args.device, overrides)
        measure(step, args.device, 3)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    args.out.write_text(
        json.dumps({"preset": args.preset, "batch": args.batch, "size": args.size, "device": args.device, "rows": rows}, indent=1)
    )
    print("\n" + "\n".join(f"{r['variant']:24s} {r['images_per_s']:8.1f} img/s  (setup {r['setup_s']:.0f}s)" for r in rows))


if __name__ == "__main__":
    main()
