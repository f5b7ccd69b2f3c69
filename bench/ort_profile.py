"""Where does the served ONNX Runtime path spend its time on the GPU, and which CUDA EP settings change it?

Three related questions, each a part of one run on one exported model directory (torch-free); the
third (`--shape-probe`: what a CUDA session's first run of each new input shape costs) runs alone:
1. Variants of the served session timed in one run, as ratios to the served settings (fp16, IO
   binding with device-resident input and output, EXHAUSTIVE cuDNN search): NHWC convolutions
   (`prefer_nhwc`), HEURISTIC cuDNN search, TF32 off, and a CUDA graph replay of the fixed shape
   (`enable_cuda_graph`; possible since the runtime runs a fixed set of batch sizes).
2. Time per operator type of the served session, from ORT's profiler in a child process with
   CUDA_LAUNCH_BLOCKING=1, so that each node's duration covers its GPU work.

    python -m bench.ort_profile --model models/pretrained/photo-f8-simvq-16k --out $OUT/ort_profile.json

Committed runs: bench/results/ort_profile/
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness.record import REPO
from models.core.artefacts import read_manifest
from models.runtime.onnx import cuda_provider_options, session_options


def make_session(path: Path, cuda: bool, overrides: dict[str, str] | None = None, profile_dir: Path | None = None) -> Any:
    import onnxruntime as ort

    opts = session_options(None)
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_dir / path.stem)
    providers: list[Any] = ["CPUExecutionProvider"]
    if cuda:
        providers = [("CUDAExecutionProvider", cuda_provider_options(overrides)), "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), opts, providers=providers)


def inputs(model_dir: Path, batch: int, size: int) -> dict[str, np.ndarray]:
    manifest, _ = read_manifest(model_dir)
    m = manifest["model"]
    rng = np.random.default_rng(0)
    g = size // int(m["downsample"])
    return {
        "images": rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8),
        "tokens": rng.integers(0, int(m["codebook_size"]), size=(batch, g, g), dtype=np.int32),
    }


def runner(session: Any, name: str, array: np.ndarray, cuda: bool) -> Any:
    """Device-resident input and output (the engine alone), as bench/gpu_throughput.py times it."""
    import onnxruntime as ort

    if not cuda:
        return lambda: session.run(None, {name: array})
    value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
    out = session.get_outputs()[0]
    binding = session.io_binding()
    binding.bind_ortvalue_input(name, value)
    binding.bind_output(out.name, "cuda")
    return lambda: session.run_with_iobinding(binding)


def graph_runner(session: Any, name: str, array: np.ndarray) -> Any:
    """CUDA graph replay: fixed input and output buffers (ORT captures on the first runs)."""
    import onnxruntime as ort

    value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
    first = session.run(None, {name: array})[0]  # output shape and dtype, without the graph
    out = ort.OrtValue.ortvalue_from_shape_and_type(first.shape, first.dtype, "cuda", 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input(name, value)
    binding.bind_ortvalue_output(session.get_outputs()[0].name, out)
    return lambda: session.run_with_iobinding(binding)


def time_call(fn: Any, seconds: float) -> float:
    for _ in range(3):
        fn()
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()  # run_with_iobinding synchronises the stream before it returns
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# CUDA EP settings compared against the served ones, by name
CUDA_OPTIONS: dict[str, dict[str, str]] = {
    "served": {},
    "nhwc": {"prefer_nhwc": "1"},
    "heuristic": {"cudnn_conv_algo_search": "HEURISTIC"},
    "no-tf32": {"use_tf32": "0"},
    "cuda-graph": {"enable_cuda_graph": "1"},
    "default-search": {"cudnn_conv_algo_search": "DEFAULT"},
    "no-max-workspace": {"cudnn_conv_use_max_workspace": "0"},
    "arena-pow2": {"arena_extend_strategy": "kNextPowerOfTwo"},
}
VARIANTS = {k: CUDA_OPTIONS[k] for k in ("served", "nhwc", "heuristic", "no-tf32", "cuda-graph")}


def variants(model_dir: Path, precision: str, batches: list[int], size: int, seconds: float, cuda: bool) -> list[dict[str, Any]]:
    manifest, _ = read_manifest(model_dir)
    graphs = manifest["graphs"][precision]
    rows: list[dict[str, Any]] = []
    for batch in batches:
        data = inputs(model_dir, batch, size)
        for part, name in (("encoder", "images"), ("decoder", "tokens")):
            base = None
            for variant, overrides in VARIANTS.items() if cuda else [("served", {})]:
                row: dict[str, Any] = {"part": part, "batch": batch, "size": size, "variant": variant, "precision": precision}
                try:
                    session = make_session(model_dir / graphs[part], cuda, overrides)
                    if variant == "cuda-graph":
                        fn = graph_runner(session, name, data[name])
                    else:
                        fn = runner(session, name, data[name], cuda)
                    sec = time_call(fn, seconds)
                    row.update(seconds=sec, images_per_s=batch / sec)
                    base = sec if variant == "served" else base
                    row["vs_served"] = base / sec if base else None
                    del fn, session
                except Exception as exc:  # a setting this ORT build or graph refuses: record it
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                rows.append(row)
                ips = f"{row['images_per_s']:9.1f} img/s  x{row['vs_served']:.2f}" if "seconds" in row else row["error"][:120]
                print(f"  {part:8s} b{batch:<3d} {variant:11s} {ips}", flush=True)
    return rows


def profile_child(model_dir: Path, precision: str, batch: int, size: int, iters: int, cuda: bool) -> dict[str, Any]:
    """Runs in a child with CUDA_LAUNCH_BLOCKING=1: every kernel finishes before its node's timer stops."""
    manifest, _ = read_manifest(model_dir)
    graphs = manifest["graphs"][precision]
    data = inputs(model_dir, batch, size)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part, name in (("encoder", "images"), ("decoder", "tokens")):
            session = make_session(model_dir / graphs[part], cuda, profile_dir=Path(tmp))
            fn = runner(session, name, data[name], cuda)
            for _ in range(3):
                fn()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            wall = (time.perf_counter() - t0) / iters
            events = json.loads(Path(session.end_profiling()).read_text())
            by_op: dict[str, float] = defaultdict(float)
            counts: dict[str, int] = defaultdict(int)
            runs = 0
            for ev in events:
                if ev.get("cat") == "Session" and ev.get("name") == "model_run":
                    runs += 1
                if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
                    continue
                op = ev.get("args", {}).get("op_name", "?")
                by_op[op] += float(ev["dur"])
                counts[op] += 1
            runs = max(runs, 1)
            total = sum(by_op.values())
            ops = sorted(by_op.items(), key=lambda kv: -kv[1])
            result[part] = {
                "wall_ms_per_run_blocking": 1e3 * wall,
                "node_ms_per_run": total / runs / 1e3,
                "ops": [
                    {"op": op, "ms_per_run": us / runs / 1e3, "share": us / total, "nodes_per_run": counts[op] / runs} for op, us in ops
                ],
            }
    return result


SHAPE_PROBE_OPTIONS = {k: CUDA_OPTIONS[k] for k in ("served", "heuristic", "default-search", "no-max-workspace", "arena-pow2")}


def shape_probe(
    model_dir: Path, precision: str, settings: list[str] | None = None, batches: tuple[int, ...] = (2, 3, 4, 6, 16, 64)
) -> dict[str, Any]:
    """Per CUDA EP setting: load, warm every bucket (as the server does), then time each batch size
    twice (ms). A setting under which warmed shapes stay slow shows up here."""
    from models.runtime.onnx import ModelRuntime

    rng = np.random.default_rng(0)
    x = {b: rng.integers(0, 256, size=(b, 256, 256, 3), dtype=np.uint8) for b in batches}
    out: dict[str, Any] = {}
    for name, overrides in SHAPE_PROBE_OPTIONS.items():
        if settings and name not in settings:
            continue
        rt = ModelRuntime.load(model_dir, device="cuda", precision=precision, max_batch_size=64, cuda_options=overrides)  # type: ignore[arg-type]
        row0 = {"session_per_shape": bool(rt.session_shapes())}
        t0 = time.perf_counter()
        rt.warmup([(256, 256)])
        row: dict[str, Any] = {**row0, "warmup_s": time.perf_counter() - t0}
        for b in batches:
            times = []
            for _ in range(2):
                t = time.perf_counter()
                rt.encode(x[b])
                times.append(round(1e3 * (time.perf_counter() - t), 2))
            row[f"b{b}_ms"] = times
        out[name] = row
        print(name, json.dumps(row), flush=True)
        del rt
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "pretrained" / "photo-f8-simvq-16k")
    ap.add_argument("--precision", default=None, help="fp16 on CUDA, fp32 on CPU by default")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--seconds", type=float, default=1.5, help="timing per variant")
    ap.add_argument("--profile-batch", type=int, default=64)
    ap.add_argument("--profile-iters", type=int, default=10)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape-probe", action="store_true", help="only the warmed-shape timing per CUDA EP setting (CUDA)")
    ap.add_argument("--probe-settings", nargs="*", default=None, choices=list(SHAPE_PROBE_OPTIONS), help="shape probe: these only")
    args = ap.parse_args()
    import onnxruntime as ort

    cuda = args.device == "cuda" or (args.device == "auto" and "CUDAExecutionProvider" in ort.get_available_providers())
    precision = args.precision or ("fp16" if cuda else "fp32")
    if args.shape_probe:
        result = shape_probe(args.model, precision, args.probe_settings)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        return
    if args.child:
        print(json.dumps(profile_child(args.model, precision, args.profile_batch, args.size, args.profile_iters, cuda)))
        return
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "model": str(args.model),
        "precision": precision,
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
    }
    if cuda:  # the GPU's name without torch
        report["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=False
        ).stdout.strip()
    report["variants"] = variants(args.model, precision, args.batches, args.size, args.seconds, cuda)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    env = os.environ | {"CUDA_LAUNCH_BLOCKING": "1"}
    child = [
        sys.executable,
        "-m",
        "bench.ort_profile",
        "--child",
        "--model",
        str(args.model),
        "--precision",
        precision,
        "--size",
        str(args.size),
    ]
    child += ["--profile-batch", str(args.profile_batch), "--profile-iters", str(args.profile_iters), "--device", "cuda" if cuda else "cpu"]
    proc = subprocess.run(child, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        report["profile"] = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        report["profile_error"] = proc.stderr[-2000:]
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nvariants ({precision}, {args.size}², device-resident IO), ratio to the served settings")
    print(f"{'part':8s} {'batch':>5s} {'variant':11s} {'img/s':>9s} {'x served':>8s}")
    for r in report["variants"]:
        if "seconds" in r:
            print(f"{r['part']:8s} {r['batch']:5d} {r['variant']:11s} {r['images_per_s']:9.1f} {r['vs_served']:8.2f}")
        else:
            print(f"{r['part']:8s} {r['batch']:5d} {r['variant']:11s} failed: {r['error'][:80]}")
    for part, p in report.get("profile", {}).items():
        print(
            f"\n{part}: batch {args.profile_batch}, {p['node_ms_per_run']:.2f} ms in nodes per run "
            f"({p['wall_ms_per_run_blocking']:.2f} ms wall, launch-blocking)"
        )
        for o in p["ops"][:10]:
            print(f"  {o['op']:24s} {o['ms_per_run']:8.3f} ms  {100 * o['share']:5.1f}%  ({o['nodes_per_run']:.0f} nodes)")
    if "profile_error" in report:
        print("profile failed:", report["profile_error"][-500:])


if __name__ == "__main__":
    main()
