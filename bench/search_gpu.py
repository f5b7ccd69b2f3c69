"""How fast and how exact is the fused Triton nearest-code search against eager argmin on the GPU?

Eager argmin over the N×K score matrix against the fused Triton
kernel (models/quantizers/search_triton.py), on the shipped codebook and real latents.

Problem: N latent rows (65,536 = 64 tiles of 256×256 at f=8, and 1,024 = one tile, batch 1) against
the shipped codebook (K = 16,384, D = the model's latent_dim); latents come from encoding 256×256
crops of Kodak photos with the shipped encoder (real data has near-ties that random data lacks).

Paths, each timed with CUDA events (warm-up, then the median of --repeats single-call timings):
  eager-fp32      argmin(‖c‖² − 2·z@Cᵀ), float32 matmul (TF32 off): the exact reference
  eager-tf32      the same with TF32 matmuls
  shipped         models.quantizers.functional.nearest_code (addmm, row chunks): what VQ runs today
  compile-chunked torch.compile of nearest_code_chunked (code chunks, running min), TF32 off
  triton-ieee     the fused kernel, float32 FMA dot (autotuned tile)
  triton-tf32     the fused kernel, TF32 tensor-core dot
  triton-tf32x3   the fused kernel, 3×TF32 dot (near-float32 accuracy on tensor cores)
Up to --graph-max-rows rows, each path is also timed as 20 calls captured in a CUDA graph ("graph
ms"): the GPU's own time per call, without the host overhead that dominates at batch 1.
Each path's tokens are compared with eager-fp32 (agreement, and how much farther a disagreeing
pick is, in float64) and with a float64 argmin.

  python -m bench.search_gpu --out bench/results/code_search/gpu-KIND-DATE/search_gpu.json               # GPU
  python -m bench.search_gpu --device cpu --small --out /tmp/search_cpu.json    # CPU smoke
  TRITON_INTERPRET=1 python -m bench.search_gpu --device cpu --small ...        # + kernel, interpreted

Committed runs: bench/results/code_search/
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bench.harness.record import REPO as ROOT
from models.quantizers.functional import nearest_code
from models.quantizers.search_triton import (
    AUTOTUNE_CONFIGS,
    best_config,
    interpreter_enabled,
    nearest_code_chunked,
    nearest_code_triton,
    triton_available,
)
from models.tokenizer import Tokenizer

DEFAULT_MODEL = ROOT / "models" / "pretrained" / "photo-f8-simvq-16k"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "kodak"
METHODS = ("eager-fp32", "eager-tf32", "shipped", "compile-chunked", "triton-ieee", "triton-tf32", "triton-tf32x3")
REFERENCE = "eager-fp32"
SearchFn = Callable[[Tensor], Tensor]


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def matmul_precision(precision: str) -> Callable[[SearchFn], SearchFn]:
    """Run a search under torch.set_float32_matmul_precision(precision), restoring the old value."""

    def wrap(fn: SearchFn) -> SearchFn:
        @functools.wraps(fn)
        def run(z: Tensor) -> Tensor:
            old = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(precision)
            try:
                return fn(z)
            finally:
                torch.set_float32_matmul_precision(old)

        return run

    return wrap


# --- data ---------------------------------------------------------------------------------------


def load_tiles(data: Path, tile: int, count: int) -> tuple[Tensor, list[str]]:
    """`count` non-overlapping tile×tile crops from the images in `data`, taken round-robin over the
    images (first tile of every image, then the second, ...), cycled if there are too few.
    Returns uint8 (count, H, W, 3) and 'name@y,x' labels."""
    paths = sorted(p for p in data.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise SystemExit(f"no images in {data} (pass --data)")
    per_image: list[list[tuple[np.ndarray, str]]] = []
    for p in paths:
        img = np.asarray(Image.open(p).convert("RGB"))
        h, w = img.shape[:2]
        per_image.append(
            [
                (img[y : y + tile, x : x + tile], f"{p.name}@{y},{x}")
                for y in range(0, h - tile + 1, tile)
                for x in range(0, w - tile + 1, tile)
            ]
        )
    order = [crops[i] for i in range(max(map(len, per_image))) for crops in per_image if i < len(crops)]
    picked = [order[i % len(order)] for i in range(count)]
    return torch.from_numpy(np.stack([t for t, _ in picked])), [label for _, label in picked]


@torch.no_grad()
def encode_latents(tok: Tokenizer, tiles: Tensor, device: torch.device, batch: int) -> Tensor:
    """uint8 (T, H, W, 3) -> float32 latents (T·h·w, D), rows in the quantizer's order."""
    rows = []
    for start in range(0, tiles.shape[0], batch):
        x = tiles[start : start + batch].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        z = tok.encoder(x)  # (B, D, h, w)
        rows.append(z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
    return torch.cat(rows).contiguous()


# --- timing ---------------------------------------------------------------------------------------


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of `repeats` single calls after `warmup` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_graph(fn: Callable[[], Any], device: torch.device, repeats: int, calls: int = 20) -> list[float]:
    """Milliseconds per call with `calls` calls captured in one CUDA graph and replayed: the GPU's
    own time, without the Python and launch overhead that dominates at batch 1."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    del graph
    return [start.elapsed_time(end) / calls for start, end in events]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- accuracy -------------------------------------------------------------------------------------


@torch.no_grad()
def float64_search(z: Tensor, codebook: Tensor, rows: int = 2048) -> tuple[Tensor, Tensor, Tensor]:
    """float64 argmin, and the best and second-best float64 squared distances per row."""
    c64 = codebook.double()
    csq = c64.pow(2).sum(-1)
    idx, d1, d2 = [], [], []
    for start in range(0, z.shape[0], rows):
        z64 = z[start : start + rows].double()
        scores = torch.addmm(csq.unsqueeze(0), z64, c64.t(), alpha=-2.0)
        top = torch.topk(scores, 2, dim=1, largest=False)
        znorm = z64.pow(2).sum(-1)
        idx.append(top.indices[:, 0])
        d1.append(top.values[:, 0] + znorm)
        d2.append(top.values[:, 1] + znorm)
    return torch.cat(idx), torch.cat(d1), torch.cat(d2)


@torch.no_grad()
def compare(z: Tensor, codebook: Tensor, got: Tensor, ref: Tensor, truth: Tensor) -> dict[str, Any]:
    """Agreement with the reference and with the float64 argmin; for disagreeing rows, how much
    farther (float64 squared distance) the pick is than the reference's pick."""
    diff = (got != ref).nonzero().squeeze(1)
    out: dict[str, Any] = {
        "agree_ref": float((got == ref).float().mean()),
        "mismatch_ref": int(diff.numel()),
        "agree_fp64": float((got == truth).float().mean()),
        "mismatch_fp64": int((got != truth).sum()),
    }
    if diff.numel():
        zr = z[diff].double()
        d_got = (zr - codebook[got[diff]].double()).pow(2).sum(-1)
        d_ref = (zr - codebook[ref[diff]].double()).pow(2).sum(-1)
        excess = (d_got - d_ref) / d_ref.clamp_min(1e-30)
        out["max_rel_excess_vs_ref"] = float(excess.max())
        out["median_rel_excess_vs_ref"] = float(excess.median())
    return out


# --- paths ------------------------------------------------------------------------------------------


def build_methods(codebook: Tensor, csq: Tensor, args: argparse.Namespace, device: torch.device) -> dict[str, SearchFn | str]:
    """name -> search function, or a string saying why the path is skipped."""
    chunk = args.chunk

    @matmul_precision("highest")
    def eager_fp32(z: Tensor) -> Tensor:
        return torch.argmin(csq - 2 * (z @ codebook.t()), dim=1)

    @matmul_precision("high")
    def eager_tf32(z: Tensor) -> Tensor:
        return torch.argmin(csq - 2 * (z @ codebook.t()), dim=1)

    @matmul_precision("highest")
    def shipped(z: Tensor) -> Tensor:
        return nearest_code(z, codebook)

    compiled = torch.compile(functools.partial(nearest_code_chunked, chunk=chunk), dynamic=False, mode=args.compile_mode)

    @matmul_precision("highest")
    def compile_chunked(z: Tensor) -> Tensor:
        return compiled(z, codebook, csq)

    methods: dict[str, SearchFn | str] = {"eager-fp32": eager_fp32, "shipped": shipped}
    methods["eager-tf32"] = eager_tf32 if device.type == "cuda" else "no TF32 on CPU"
    methods["compile-chunked"] = "--no-compile" if args.no_compile else compile_chunked
    triton_skip = None
    if not triton_available():
        triton_skip = "triton cannot be imported"
    elif device.type != "cuda" and not interpreter_enabled():
        triton_skip = "CPU without TRITON_INTERPRET=1"
    for precision in ("ieee", "tf32", "tf32x3"):
        name = f"triton-{precision}"
        if triton_skip:
            methods[name] = triton_skip
        else:
            methods[name] = functools.partial(nearest_code_triton, codebook=codebook, codebook_sq=csq, precision=precision)
    return {name: methods[name] for name in METHODS if name in args.methods}


def sweep_configs(
    z: Tensor, codebook: Tensor, csq: Tensor, ref: Tensor, device: torch.device, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every autotune config at fixed tile shape, for the record (which tiles win where)."""
    rows = []
    for precision in ("ieee", "tf32", "tf32x3"):
        for cfg in AUTOTUNE_CONFIGS:
            try:
                fn = functools.partial(nearest_code_triton, z, codebook, csq, precision, config=dict(cfg))  # type: ignore[arg-type]
                got = fn()
                times = time_calls(fn, device, args.warmup, args.repeats)
                rows.append(
                    {"precision": precision, **cfg, "median_ms": statistics.median(times), "agree_ref": float((got == ref).float().mean())}
                )
            except Exception as exc:  # a config that does not compile is a result, not a crash
                rows.append({"precision": precision, **cfg, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


def run_size(n: int, base: Tensor, codebook: Tensor, csq: Tensor, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    reps = math.ceil(n / base.shape[0])
    z = base.repeat(reps, 1)[:n].contiguous() if reps > 1 else base[:n].contiguous()
    k, d = codebook.shape
    truth, d1, d2 = float64_search(z, codebook)
    gap = d2 - d1
    result: dict[str, Any] = {
        "rows": n,
        "distinct_rows": int(min(n, base.shape[0])),
        "gap_fp64": {
            "median_row_sq_norm": float(z.double().pow(2).sum(-1).median()),
            "median_code_sq_norm": float(csq.median()),
            "median_best_sq_distance": float(d1.median()),
            "quantiles_second_minus_best": {str(q): float(torch.quantile(gap.float().cpu(), q)) for q in (0.0, 0.001, 0.01, 0.5)},
            "rows_gap_below": {str(t): int((gap < t).sum()) for t in (1e-6, 1e-5, 1e-4, 1e-3)},
        },
        "methods": {},
    }
    methods = build_methods(codebook, csq, args, device)
    ref: Tensor | None = None
    flops = 2.0 * n * k * d
    for name, fn in methods.items():
        entry: dict[str, Any] = {}
        result["methods"][name] = entry
        if isinstance(fn, str):
            entry["skipped"] = fn
            continue
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            got = fn(z)  # first call: compile / autotune
            sync(device)
            entry["first_call_s"] = time.perf_counter() - t0
            times = time_calls(functools.partial(fn, z), device, args.warmup, args.repeats)
            entry.update(
                median_ms=statistics.median(times),
                min_ms=min(times),
                p90_ms=float(np.percentile(times, 90)),
                repeats=len(times),
                gflops=flops / (statistics.median(times) * 1e-3) / 1e9,
            )
            if device.type == "cuda":
                entry["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                if args.graphs and n <= args.graph_max_rows:
                    try:
                        graph_ms = time_graph(functools.partial(fn, z), device, args.repeats)
                        entry["graph_median_ms"] = statistics.median(graph_ms)
                    except Exception as exc:  # a path that cannot be captured is a result, not a crash
                        entry["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
                        torch.cuda.synchronize(device)
            if name == REFERENCE:
                ref = got
            if ref is not None:
                entry.update(compare(z, codebook, got, ref, truth))
            if name.startswith("triton-") and not interpreter_enabled():
                entry["autotuned"] = best_config(name.removeprefix("triton-"))  # type: ignore[arg-type]
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
    if args.sweep and ref is not None and device.type == "cuda" and triton_available():
        result["sweep"] = sweep_configs(z, codebook, csq, ref, device, args)
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    head = f"{'N':>7} {'path':<16} {'median ms':>10} {'min ms':>9} {'graph ms':>9} {'GFLOP/s':>9} {'× eager':>8} {'× shipped':>9} {'agree ref':>10} {'≠ref':>6} {'agree f64':>10} {'peak MiB':>9}"
    print(head)
    print("-" * len(head))
    for res in results:
        ms = res["methods"]
        base = ms.get(REFERENCE, {}).get("median_ms")
        shipped = ms.get("shipped", {}).get("median_ms")
        for name, e in ms.items():
            if "median_ms" not in e:
                print(f"{res['rows']:>7} {name:<16} {e.get('skipped') or e.get('error', '')[:100]}")
                continue
            t = e["median_ms"]
            x_eager = f"{base / t:.2f}" if base else "-"
            x_ship = f"{shipped / t:.2f}" if shipped else "-"
            agree = f"{100 * e['agree_ref']:.4f}%" if "agree_ref" in e else "-"
            f64 = f"{100 * e['agree_fp64']:.4f}%" if "agree_fp64" in e else "-"
            mism = str(e.get("mismatch_ref", "-"))
            peak = f"{e['peak_mem_mib']:.0f}" if "peak_mem_mib" in e else "-"
            graph = f"{e['graph_median_ms']:.3f}" if "graph_median_ms" in e else "-"
            print(
                f"{res['rows']:>7} {name:<16} {t:>10.3f} {e['min_ms']:>9.3f} {graph:>9} {e['gflops']:>9.0f} {x_eager:>8} {x_ship:>9} {agree:>10} {mism:>6} {f64:>10} {peak:>9}"
            )
        gaps = res["gap_fp64"]["rows_gap_below"]
        print(f"{res['rows']:>7} rows whose best two codes are closer than t (float64 squared distance): {gaps}")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="smoke sizes: N = 1,024 and 256, few repeats")
    ap.add_argument("--rows", type=int, nargs="+", help="N values (default 65536 1024; --small: 1024 256)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of photos (default ../shared/data/kodak)")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--max-tiles", type=int, default=64, help="distinct tiles to encode; N beyond them repeats rows")
    ap.add_argument("--warmup", type=int, help="default 5 (--small: 1)")
    ap.add_argument("--repeats", type=int, help="timed calls per path, median reported (default 25; --small: 5)")
    ap.add_argument("--chunk", type=int, default=4096, help="codes per chunk of nearest_code_chunked")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--no-compile", action="store_true", help="skip compile-chunked")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for compile-chunked (default: default mode)")
    ap.add_argument("--sweep", action="store_true", help="also time every Triton tile config at every N")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="skip the CUDA-graph replay timings")
    ap.add_argument(
        "--graph-max-rows", type=int, default=8192, help="CUDA-graph timings only up to this N (host overhead is negligible above)"
    )
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="torch CPU threads")
    ap.add_argument("--revision", default=None, help="git revision to record (default: git rev-parse here)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/search_gpu.json"))
    args = ap.parse_args()
    args.rows = args.rows or ([1024, 256] if args.small else [65536, 1024])
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 5)
    args.repeats = args.repeats if args.repeats is not None else (5 if args.small else 25)
    if args.small:
        args.max_tiles = min(args.max_tiles, 4)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu)")
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False  # float32 encoder convolutions, for reproducible latents

    tok = Tokenizer.from_pretrained(args.model, map_location=device).eval()
    quantizer = tok.quantizer
    if not hasattr(quantizer, "codebook"):
        raise SystemExit(f"{args.model} is not a VQ model")
    with torch.no_grad():
        codebook = quantizer.codebook().detach().float().contiguous()  # type: ignore[operator]
    csq = codebook.pow(2).sum(-1)
    k, d = codebook.shape
    tokens_per_tile = (args.tile // tok.downsample) ** 2
    n_tiles = min(args.max_tiles, math.ceil(max(args.rows) / tokens_per_tile))
    tiles, labels = load_tiles(args.data, args.tile, n_tiles)
    t0 = time.perf_counter()
    latents = encode_latents(tok, tiles, device, batch=16)
    sync(device)
    encode_s = time.perf_counter() - t0
    del tok
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"{gpu}: K={k} D={d}, {latents.shape[0]} distinct latent rows from {n_tiles} tiles of {args.data.name} (encoded in {encode_s:.1f} s)"
    )
    print(f"torch {torch.__version__}, triton {triton_version()}, interpreter={interpreter_enabled()}, threads={args.threads}\n")

    results = [run_size(n, latents, codebook, csq, args, device) for n in args.rows]
    print_table(results)
    record = {
        "benchmark": "nearest-code search (bench/search_gpu.py)",
        "device": gpu,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version(),
        "triton_interpreter": interpreter_enabled(),
        "python": platform.python_version(),
        "git_revision": args.revision or git_revision(),
        "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
        "codebook_size": k,
        "dim": d,
        "latents": {"tiles": labels, "tile": args.tile, "distinct_rows": latents.shape[0]},
        "timing": {
            "warmup": args.warmup,
            "repeats": args.repeats,
            "clock": "CUDA events" if device.type == "cuda" else "perf_counter",
            "threads": args.threads,
        },
        "chunk": args.chunk,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


def triton_version() -> str | None:
    if not triton_available():
        return None
    import triton

    return str(triton.__version__)


if __name__ == "__main__":
    main()
