"""Does decoding small images on a front's event loop (not in its decode threads) cut its CPU per request?

One front kept busy, with small images decoded on its event loop or in its decode threads: the
front's and the inference process's CPU per request, requests/s and latency, A/B in one run.

A split server (`--front-workers 1`; 0: the single-process server) serves a tiny untrained model (f8 FSQ at 32², `bench.harness.fixtures.tiny_model`, so
that the model costs next to nothing and the front is the limit on a small host); a closed-loop load
of real 256² JPEGs (resize=crop) comes from `bench.harness.load`. Each round starts
the server twice, with `inline_decode_pixels=0` (every image in the decode threads: the behaviour
before the setting) and with the default (256²), alternating, so drift hits both alike. Prints a
table, writes JSON.

    python -m bench.front_inline_cpu --rounds 2 --seconds 20 --out bench/results/front_inline/cpu-DATE/one_image.json
    python -m bench.front_inline_cpu --images-per-request 8 --concurrency 8 ...

Committed runs: bench/results/front_inline/
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness.fixtures import tiny_model, tiny_server_args
from bench.harness.load import read_jpegs, run_load
from bench.harness.procs import tree_cpu_seconds
from bench.harness.record import PHOTOS_VAL, host_fields
from bench.harness.server import encode_requests, spawn_server, stop_server, wait_ready
from service.settings import Settings


def one(args: argparse.Namespace, files: list[bytes], budget: int, log: Path) -> dict[str, Any]:
    server_args = tiny_server_args(args.model_repo, args.model, args.concurrency, args.images_per_request, args.decode_threads)
    env = {**os.environ, "VQTOK_INLINE_DECODE_PIXELS": str(budget)}
    proc, url = spawn_server(server_args, args.front_workers, log, env=env)
    try:
        wait_ready(proc, url, log)
        cpu0, req0 = tree_cpu_seconds(proc.pid), encode_requests(url)
        level = run_load(url, files, args.concurrency, args.seconds, 1, "crop", per_req=args.images_per_request)
        cpu1, req1 = tree_cpu_seconds(proc.pid), encode_requests(url)
    finally:
        stop_server(proc)
    n = max(1.0, req1 - req0)
    return {
        "inline_decode_pixels": budget,
        "requests_per_s": level["images_per_s"] / args.images_per_request,
        "images_per_s": level["images_per_s"],
        "p50_ms": level["p50_ms"],
        "p99_ms": level["p99_ms"],
        "mean_group": level["mean_group"],
        "mean_batch": level["mean_batch"],
        "errors": level["errors"],
        "cpu_ms_per_request": {
            k: 1000 * (cpu1.get(k, 0.0) - cpu0.get(k, 0.0)) / n for k in ("fronts", "engine", "engine_loop", "server", "total")
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=PHOTOS_VAL)
    ap.add_argument("--model-repo", type=Path, default=None, help="a repository holding --model (default: a tiny model exported here)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--images-per-request", type=int, default=1)
    ap.add_argument("--decode-threads", type=int, default=2)
    ap.add_argument("--front-workers", type=int, default=1, help="0: the single-process server (its one event loop does everything)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tmp = None
    if args.model_repo is None:
        tmp = tempfile.TemporaryDirectory(prefix="vqtok-front-inline-")
        args.model_repo = Path(tmp.name)
        args.model = tiny_model(args.model_repo)
    files = read_jpegs(args.images)
    log = Path(tempfile.gettempdir()) / "vqtok-front-inline.log"
    default = Settings.model_fields["inline_decode_pixels"].default
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for budget in (0, default):
            row = one(args, files, budget, log) | {"round": r}
            runs.append(row)
            c = row["cpu_ms_per_request"]
            print(
                f"round {r} inline_decode_pixels={budget:>7d}: {row['requests_per_s']:7.1f} req/s  p50 {row['p50_ms']:6.1f} ms  "
                f"group {row['mean_group'] or 0:4.1f}  CPU ms/request: front {c['fronts']:.3f} engine {c['engine']:.3f} "
                f"total {c['total']:.3f}  errors {row['errors']}",
                flush=True,
            )
    by = {b: [x for x in runs if x["inline_decode_pixels"] == b] for b in (0, default)}

    def ratio(f: Any) -> float | None:  # default / 0, medians; None where the role did not run (single process)
        on, off = statistics.median(f(x) for x in by[default]), statistics.median(f(x) for x in by[0])
        return on / off if off else None

    summary = {
        "requests_per_s": ratio(lambda x: x["requests_per_s"]),
        "p50_ms": ratio(lambda x: x["p50_ms"]),
        "front_cpu_per_request": ratio(lambda x: x["cpu_ms_per_request"]["fronts"]),
        "engine_cpu_per_request": ratio(lambda x: x["cpu_ms_per_request"]["engine"]),
        "total_cpu_per_request": ratio(lambda x: x["cpu_ms_per_request"]["total"]),
    }
    print("\n| inline_decode_pixels | req/s | p50 ms | mean group | front CPU ms/request | engine CPU ms/request | total CPU ms/request |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for x in runs:
        c = x["cpu_ms_per_request"]
        print(
            f"| {x['inline_decode_pixels']} | {x['requests_per_s']:.1f} | {x['p50_ms']:.1f} | {x['mean_group'] or 0:.1f} "
            f"| {c['fronts']:.3f} | {c['engine']:.3f} | {c['total']:.3f} |"
        )
    print(f"default / 0 (medians): {json.dumps({k: None if v is None else round(v, 3) for k, v in summary.items()})}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
        result = {
            "setup": setup | host_fields(None),
            "runs": runs,
            "default_over_zero": summary,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
