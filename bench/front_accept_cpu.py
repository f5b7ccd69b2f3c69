"""How do a split server's connections spread over its fronts?

`front_accept=balanced` (the supervisor accepts and hands each connection to the fronts in turn)
against `shared` (every front accepts on one socket, uvicorn --workers' way) and `reuseport` (a
SO_REUSEPORT socket for each front: the kernel spreads connections by address hash), in one run.

A split server with `--fronts` fronts serves a tiny untrained model (`bench.harness.fixtures.tiny_model`,
so that the model costs next to nothing); a closed-loop load of real 256² JPEGs (resize=crop) on
`--concurrency` keep-alive connections comes from `bench.harness.load`. Three
seconds in, the established connections each front holds are counted from /proc. Each round starts
the server once per mode, alternating. Prints a table, writes JSON. The GPU figures (H100, 8/12/16
fronts) come from `bench/http_front.py` with VQTOK_FRONT_ACCEPT set: BENCHMARKS.md.

    python -m bench.front_accept_cpu --rounds 2 --fronts 4 --concurrency 64 --out bench/results/front_accept/cpu-2026-11-28/result.json

Committed runs: bench/results/front_accept/
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench.harness.fixtures import tiny_model, tiny_server_args
from bench.harness.load import read_jpegs, run_load
from bench.harness.procs import established_by_process, tree_cpu_seconds
from bench.harness.record import PHOTOS_VAL, host_fields
from bench.harness.server import spawn_server, stop_server, wait_ready


def front_pids(server_pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == server_pid and b"service.multiproc.server\0front" in cmd:
            out.append(int(entry.name))
    return sorted(out)


def one(args: argparse.Namespace, files: list[bytes], mode: str, log: Path) -> dict[str, Any]:
    server_args = tiny_server_args(args.model_repo, args.model, args.concurrency)
    proc, url = spawn_server(server_args, args.fronts, log, env={**os.environ, "VQTOK_FRONT_ACCEPT": mode})
    port = int(url.rsplit(":", 1)[1])
    spread: list[int] = []
    try:
        wait_ready(proc, url, log)
        pids = front_pids(proc.pid)
        probe = threading.Timer(3.0, lambda: spread.extend(established_by_process(pids, port)))
        probe.start()
        cpu0 = tree_cpu_seconds(proc.pid)
        level = run_load(url, files, args.concurrency, args.seconds, args.client_procs, "crop")
        cpu1 = tree_cpu_seconds(proc.pid)
        probe.join()
    finally:
        stop_server(proc)
    requests = level["images_per_s"] * args.seconds
    return {
        "front_accept": mode,
        "connections_by_front": spread,
        "max_over_mean": max(spread) / (sum(spread) / len(spread)) if spread and sum(spread) else None,
        "requests_per_s": level["images_per_s"],
        "p50_ms": level["p50_ms"],
        "p99_ms": level["p99_ms"],
        "errors": level["errors"],
        "cpu_ms_per_request": {k: 1000 * (cpu1.get(k, 0.0) - cpu0.get(k, 0.0)) / max(1.0, requests) for k in ("fronts", "engine", "total")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=PHOTOS_VAL)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fronts", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--modes", default="shared,balanced,reuseport", help="front_accept modes, alternated in each round")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    modes = args.modes.split(",")
    tmp = tempfile.TemporaryDirectory(prefix="vqtok-front-accept-")
    args.model_repo = Path(tmp.name)
    args.model = tiny_model(args.model_repo)
    files = read_jpegs(args.images)
    log = Path(tempfile.gettempdir()) / "vqtok-front-accept.log"
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for mode in modes:
            row = one(args, files, mode, log) | {"round": r}
            runs.append(row)
            print(
                f"round {r} {mode:8s}: connections by front {row['connections_by_front']}  {row['requests_per_s']:7.1f} req/s  "
                f"p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  errors {row['errors']}",
                flush=True,
            )
    print("\n| front_accept | connections by front | max / mean | req/s | p50 ms | p99 ms | front CPU ms/request |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for x in runs:
        print(
            f"| {x['front_accept']} | {'/'.join(map(str, x['connections_by_front']))} | {x['max_over_mean'] or 0:.2f} "
            f"| {x['requests_per_s']:.1f} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {x['cpu_ms_per_request']['fronts']:.3f} |"
        )
    med = {m: statistics.median(x["requests_per_s"] for x in runs if x["front_accept"] == m) for m in modes}
    ratios = {f"{m}_over_balanced_requests_per_s": med[m] / med["balanced"] for m in modes if m != "balanced" and "balanced" in med}
    print(
        "medians, req/s: " + ", ".join(f"{m} {v:.1f}" for m, v in med.items()) + "; " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
        result = {"setup": setup | host_fields(None), "runs": runs, "median_requests_per_s": med, **ratios}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
