"""Does the server's HTTP side hold the model back? HTTP images/s against the raw runtime, in one run.

For each `--front-workers` value (0: the single-process server; N: N front processes and one inference
process, service/multiproc) and each `--batch-workers` value it starts `vqtok serve`, sends real JPEGs
as multipart uploads (`--images-per-request` images a request) from separate load-generator processes
(`bench.harness.load`: raw keep-alive sockets, one measuring window) at each concurrency, and records
images/s, p50/p99 latency, the batches the server formed, the server's own batch counters over the
same window, and the server's CPU seconds per request by process role. The raw runtime
(`models.runtime.choose.load_runtime`, the server's own choice) is timed in this process on
already-decoded images at the server's max batch size, at the start and at the end, one caller and
`--raw-threads` callers; ratios are to the better of the two. Prints a table, writes JSON (after
every level).

This is the one HTTP-throughput benchmark: it replaced bench/service_load.py (an httpx load generator
that was itself the limit; its results stay under bench/results/http/), whose soak mode is
bench/service_soak.py's question.

GPU (scripts/gpu/serving.sh http runs it; the compiled runtime compiles on the first start, then
reuses $VQTOK_CACHE/inductor):

    python3 -m bench.http_front --model-repo models/pretrained --images .gpudata/photos256/val \
        --device cuda --runtime auto --front-workers 0,8 --concurrency 32,64,128,256 --images-per-request 1,8 \
        --max-batch-size 64 --client-procs 6 --decode-threads 4 --duration 6 --time-budget 540 --out $OUT/http_front_gpu.json

CPU (the tiny test model, so that HTTP is what limits):

    python -m bench.http_front --model-repo .pytest_cache/d/vqtok-test-models/<hash>/fsq4 --resize crop \
        --warmup-size 32 --device cpu --front-workers 0,2 --client-procs 1 --out bench/results/http/cpu-DATE/http_front.json

Committed runs: bench/results/: http (single runs) and serving (the GPU serving runs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness.load import read_jpegs, run_load
from bench.harness.procs import cpu_probe
from bench.harness.record import PHOTOS_VAL, host_fields
from bench.harness.server import served_batch_workers, start_server, stop_server
from bench.harness.timing import raw_throughput


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repo", type=Path, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--images", type=Path, default=PHOTOS_VAL, help="folder of JPEGs")
    p.add_argument("--resize", default="none", choices=["none", "crop", "pad"])
    p.add_argument("--warmup-size", type=int, default=256)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "compiled"])
    p.add_argument("--compile-mode", default="default", choices=["default", "max-autotune"], help="the compiled runtime's (raw and served)")
    p.add_argument("--front-workers", type=ints, default=[0, 2], help="comma-separated; 0 = single process")
    p.add_argument("--concurrency", type=ints, default=[32, 64, 128, 256])
    p.add_argument("--images-per-request", type=ints, default=[1, 8])
    p.add_argument("--duration", type=float, default=6.0, help="measured seconds per level (after 1 s of warm-up)")
    p.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-batch-delay-ms", type=float, default=2.0)
    p.add_argument(
        "--batch-workers",
        type=ints,
        default=[0],
        help="comma-separated: batches in flight per model, one server each (0: the server's default)",
    )
    p.add_argument(
        "--raw-threads", type=int, default=2, help="threads of the pipelined raw figure (reported beside the one-call-at-a-time raw)"
    )
    p.add_argument("--decode-threads", type=int, default=max(2, min(8, (os.cpu_count() or 2) // 2)))
    p.add_argument("--intra-op-threads", type=int, default=None)
    p.add_argument("--raw-seconds", type=float, default=3.0)
    p.add_argument("--time-budget", type=float, default=560.0, help="seconds for the whole run; levels that would not fit are skipped")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--revision", default=None, help="the measured commit (a GPU machine's copy may carry a stale .git)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_begin = time.monotonic()
    left = lambda: args.time_budget - (time.monotonic() - t_begin)  # noqa: E731
    files = read_jpegs(args.images)
    log_path = args.out.with_suffix(".server.log") if args.out else Path("/tmp/vqtok-http-front.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")

    from models.runtime.choose import load_runtime

    model_dir = args.model_repo / args.model if args.model else args.model_repo
    if not (model_dir / "manifest.json").exists():
        model_dir = next(d for d in sorted(args.model_repo.iterdir()) if (d / "manifest.json").exists())
    args.model = args.model or model_dir.name  # the servers answer with the model the raw figure measures
    runtime = load_runtime(
        model_dir, runtime=args.runtime, device=args.device, max_batch_size=args.max_batch_size, compile_mode=args.compile_mode
    )
    runtime.warmup([(args.warmup_size, args.warmup_size)])
    raw_before = raw_throughput(runtime, files, args.resize, args.max_batch_size, args.raw_seconds)
    piped_before = raw_throughput(runtime, files, args.resize, args.max_batch_size, args.raw_seconds, threads=args.raw_threads)
    print(
        f"  raw {getattr(runtime, 'runtime_name', '')}: {raw_before:.1f} img/s at batch {args.max_batch_size} "
        f"({piped_before:.1f} from {args.raw_threads} threads)",
        flush=True,
    )
    result: dict[str, Any] = {
        "setup": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
            **host_fields(args.revision),
            "runtime": getattr(runtime, "runtime_name", ""),
            "runtime_device": getattr(runtime, "device", ""),
            "images": len(files),
        },
        "raw_images_per_s": {"before": raw_before},
        "raw_pipelined_images_per_s": {"threads": args.raw_threads, "before": piped_before},
        "levels": [],
        "skipped": [],
    }
    per_level = args.duration + 6
    for fronts, workers in itertools.product(args.front_workers, args.batch_workers):
        todo = [(n, c) for n in args.images_per_request for c in args.concurrency]
        if left() < 60 + per_level:
            result["skipped"] += [
                {"front_workers": fronts, "batch_workers": workers, "images_per_request": n, "concurrency": c} for n, c in todo
            ]
            continue
        t0 = time.monotonic()
        proc, url = start_server(args, fronts, log_path, batch_workers=workers or None)
        ready_s = time.monotonic() - t0
        try:
            workers = served_batch_workers(url, model_dir.name) or workers  # 0: the server's default, recorded as what it runs
            print(f"  front_workers={fronts} batch_workers={workers}: server ready in {ready_s:.1f} s", flush=True)
            for n, c in todo:
                if left() < per_level + args.raw_seconds + 20:
                    result["skipped"].append({"front_workers": fronts, "batch_workers": workers, "images_per_request": n, "concurrency": c})
                    continue
                # CPU over the clients' measured window only (read at its start and end), per request answered in it
                level = run_load(url, files, c, args.duration, args.client_procs, args.resize, per_req=n, probe=cpu_probe(proc.pid))
                rates = level["server_window"].pop("rates")
                per_s = max(1e-9, level["images_per_s"] / n)  # requests answered per second in the window
                level.update(
                    front_workers=fronts,
                    batch_workers=workers,
                    images_per_request=n,
                    server_ready_s=ready_s,
                    server_cpu_s_per_request=rates["total"] / per_s,
                    server_cpu_s_per_image=rates["total"] / (per_s * n),
                    server_cpu_s_per_request_by_role={k: v / per_s for k, v in rates.items() if k not in ("total", "host")},
                    server_cores_busy=rates["total"],
                    host_cores_busy=rates["host"],  # everything on the host, load generator included
                )
                result["levels"].append(level)
                if args.out:  # as it goes: a run cut short still leaves its levels
                    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
                print(
                    f"    {n} img/request, concurrency {c:4d}: {level['images_per_s']:8.1f} img/s  p50 {level['p50_ms'] or 0:7.1f} ms  "
                    f"p99 {level['p99_ms'] or 0:7.1f} ms  batch {level['mean_batch'] or 0:5.1f}  group {level['mean_group'] or 0:4.1f}  "
                    f"CPU {1000 * level['server_cpu_s_per_request']:.2f} ms/request "
                    f"({', '.join(f'{k} {1000 * v:.2f}' for k, v in level['server_cpu_s_per_request_by_role'].items())}; "
                    f"load generator {1000 * level['client_cpu_s_per_request']:.2f})  host cores busy {level['host_cores_busy']:.1f}  "
                    f"errors {level['errors'] or 0}",
                    flush=True,
                )
        finally:
            stop_server(proc)
    raw_after = raw_throughput(runtime, files, args.resize, args.max_batch_size, args.raw_seconds)
    piped_after = raw_throughput(runtime, files, args.resize, args.max_batch_size, args.raw_seconds, threads=args.raw_threads)
    result["raw_images_per_s"]["after"] = raw_after
    result["raw_pipelined_images_per_s"]["after"] = piped_after
    raw = max(raw_before, raw_after)
    piped = max(piped_before, piped_after)
    result["raw_images_per_s"]["used"] = raw
    result["raw_pipelined_images_per_s"]["used"] = piped
    for level in result["levels"]:
        level["http_over_raw"] = level["images_per_s"] / raw
        level["http_over_raw_pipelined"] = level["images_per_s"] / piped
    by_mode: dict[str, list[float]] = {}
    for level in result["levels"]:
        if 32 <= level["concurrency"] <= 256:
            workers = level.get("batch_workers", 1)
            mode = str(level["front_workers"]) if workers == 1 else f"{level['front_workers']}+bw{workers}"
            by_mode.setdefault(mode, []).append(level["http_over_raw"])
    result["http_over_raw_min"] = {k: min(v) for k, v in by_mode.items()}
    result["wall_s"] = time.monotonic() - t_begin
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


def print_table(result: dict[str, Any]) -> None:
    s, raw = result["setup"], result["raw_images_per_s"]
    print(
        f"\nHTTP front vs raw: {s['runtime']} on {s['runtime_device']}, {s['cpus']} CPUs; raw {raw['used']:.1f} img/s at batch "
        f"{s['max_batch_size']} (before {raw['before']:.1f}, after {raw['after']:.1f}); JPEGs resize={s['resize']}"
    )
    piped = result.get("raw_pipelined_images_per_s")
    if piped:
        print(f"pipelined raw ({piped['threads']} threads calling encode): {piped['used']:.1f} img/s (HTTP/pipelined in the JSON)")
    print(
        "| front_workers | batch_workers | img/request | concurrency | HTTP img/s | HTTP/raw | p50 ms | p99 ms | mean batch | mean group | server CPU ms/request | server cores busy "
        "| load generator CPU ms/request | host cores busy | errors |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for lv in result["levels"]:
        print(
            f"| {lv['front_workers']} | {lv.get('batch_workers', 1)} | {lv['images_per_request']} | {lv['concurrency']} | {lv['images_per_s']:.1f} | {lv['http_over_raw']:.2f} "
            f"| {lv['p50_ms'] or 0:.1f} | {lv['p99_ms'] or 0:.1f} | {lv['mean_batch'] or 0:.1f} | {lv['mean_group'] or 0:.1f} "
            f"| {1000 * lv['server_cpu_s_per_request']:.2f} "
            f"| {lv['server_cores_busy']:.2f} | {1000 * lv['client_cpu_s_per_request']:.2f} | {lv['host_cores_busy']:.1f} | {lv['errors'] or 0} |"
        )
    print(f"minimum HTTP/raw over concurrency 32-256, by front_workers (+batch workers): {result['http_over_raw_min']}")
    if result["skipped"]:
        print(f"skipped (time budget): {result['skipped']}")


if __name__ == "__main__":
    sys.exit(main())
