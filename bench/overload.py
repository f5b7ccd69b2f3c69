"""Does the server refuse at once what it cannot serve in time, and keep its goodput under overload?

Starts `vqtok serve` (CPU or GPU, one process or `--front-workers N`) with a request deadline, measures its
capacity (images/s answered by a closed loop that keeps its queue full and, as the Python client does,
waits out a 503's Retry-After), sends `--burst` requests at
once (the issue's scenario: 64 encodes against a 3 s deadline), then offers an open-loop Poisson load of
1x, 2x and 4x that capacity for `--seconds` each, from client processes of their own. Each request is one
real 256² JPEG from photos256/val (resize=crop). `--baseline DIR` measures a checkout of the code before
admission the same way, in the same run (`git worktree add DIR 6b64f37^`). Per level it reports:

- goodput: answers within the deadline, per second, and as a share of the capacity;
- refusals (503): how many, and the p50/p99 time from sending to the refusal;
- 504s: requests the server admitted and then could not finish in time;
- late 200s: answers after the deadline (the client's clock), which count against goodput.

    python -m bench.overload --front-workers 0,2 --deadline 3 --seconds 60 --baseline ../before --out bench/results/overload/cpu-DATE/overload.json

Prints a table and writes the JSON (machine, revision, settings, every level).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness.record import PHOTOS_VAL, REPO, RESULTS, host_fields, table, write_json
from bench.harness.server import VQTOK, free_port, stop_server, wait_ready


def git_short(checkout: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True).stdout.strip() or "unknown"


def start_server(args: argparse.Namespace, checkout: Path, front_workers: int, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`vqtok serve` from `checkout` (this one, or the baseline's: its packages first on the path) with the deadline."""
    port = free_port()
    cmd = [*VQTOK, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", args.device, "--log-level", "warning"]
    cmd += ["--front-workers", str(front_workers), "--request-timeout-s", str(args.deadline)]
    if args.model_repo:
        cmd += ["--model-repo", str(args.model_repo)]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    proc = subprocess.Popen(cmd, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=checkout, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, log_path)
    return proc, url


def load_images(folder: Path, n: int) -> list[bytes]:
    files = sorted(folder.glob("*.jpg"))[:n]
    if not files:
        raise SystemExit(f"no JPEGs in {folder}")
    return [f.read_bytes() for f in files]


# --- the clients (each in a process of its own) ---


def _closed_loop(url: str, images: list[bytes], concurrency: int, seconds: float, out: Any) -> None:

    async def main() -> None:
        done = 0
        stop = time.monotonic() + seconds
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as c:

            async def worker(i: int) -> None:
                nonlocal done
                while time.monotonic() < stop:
                    r = await c.post(
                        "/v1/encode", files={"images": ("a.jpg", images[i % len(images)], "image/jpeg")}, data={"resize": "crop"}
                    )
                    if r.status_code == 200 and time.monotonic() < stop:
                        done += 1
                    elif r.status_code == 503:  # as the Python client does: wait out Retry-After, not hammer
                        await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), max(0.0, stop - time.monotonic())))
                    i += concurrency

            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        out.put(done)

    asyncio.run(main())


async def _send(c: httpx.AsyncClient, images: list[bytes], i: int, results: list[tuple[int, float, float]]) -> None:
    """One encode of image `i` (resize=crop); appends (status, seconds to the answer, sent at); status 0: no answer."""
    sent = time.monotonic()
    try:
        r = await c.post("/v1/encode", files={"images": ("a.jpg", images[i % len(images)], "image/jpeg")}, data={"resize": "crop"})
        status = r.status_code
    except httpx.HTTPError:
        status = 0
    results.append((status, time.monotonic() - sent, sent))


def _open_loop(url: str, images: list[bytes], rate: float, seconds: float, deadline: float, seed: int, out: Any) -> None:
    """Poisson arrivals at `rate` a second; every request is sent when it is due, whatever is in flight."""

    async def main() -> None:
        rng = random.Random(seed)
        results: list[tuple[int, float, float]] = []  # (status, seconds to the answer, sent at)
        async with httpx.AsyncClient(base_url=url, timeout=deadline + 30, limits=httpx.Limits(max_connections=None)) as c:
            tasks = []
            start = time.monotonic()
            t, i = 0.0, 0
            while t < seconds:
                delay = start + t - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_send(c, images, i, results)))
                i += 1
                t += rng.expovariate(rate)
            await asyncio.gather(*tasks)
        out.put(results)

    asyncio.run(main())


def _burst(url: str, images: list[bytes], n: int, out: Any) -> None:
    """`n` requests sent at once (the issue's scenario: more than fits in one deadline, all at the same moment)."""

    async def main() -> None:
        results: list[tuple[int, float, float]] = []
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=None)) as c:
            await asyncio.gather(*(_send(c, images, i, results) for i in range(n)))
        out.put(results)

    asyncio.run(main())


def burst(url: str, images: list[bytes], n: int) -> list[tuple[int, float, float]]:
    q: Any = mp.Queue()
    p = mp.Process(target=_burst, args=(url, images, n, q))
    p.start()
    results: list[tuple[int, float, float]] = q.get()
    p.join()
    return results


def capacity(url: str, images: list[bytes], concurrency: int, seconds: float) -> float:
    q: Any = mp.Queue()
    p = mp.Process(target=_closed_loop, args=(url, images, concurrency, seconds, q))
    p.start()
    done = q.get()
    p.join()
    return float(done) / seconds


def offer(url: str, images: list[bytes], rate: float, seconds: float, deadline: float, procs: int) -> list[tuple[int, float, float]]:
    q: Any = mp.Queue()
    ps = [mp.Process(target=_open_loop, args=(url, images, rate / procs, seconds, deadline, 1000 + k, q)) for k in range(procs)]
    for p in ps:
        p.start()
    results: list[tuple[int, float, float]] = []
    for _ in ps:
        results += q.get()
    for p in ps:
        p.join()
    return results


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarise(results: list[tuple[int, float, float]], seconds: float, deadline: float, cap: float, multiple: float) -> dict[str, Any]:
    good = [s for s, dt, _ in results if s == 200 and dt <= deadline]
    late = [s for s, dt, _ in results if s == 200 and dt > deadline]
    refused = [dt for s, dt, _ in results if s == 503]
    timeouts = [dt for s, dt, _ in results if s == 504]
    other = sorted({s for s, _, _ in results if s not in (200, 503, 504)})
    return {
        "offered_x_capacity": multiple,
        "requests": len(results),
        "offered_per_s": len(results) / seconds,
        "goodput_per_s": len(good) / seconds,
        "goodput_over_capacity": len(good) / seconds / cap,
        "ok": len(good),
        "late_200": len(late),
        "refused_503": len(refused),
        "refusal_p50_ms": None if not refused else 1000 * (pct(refused, 0.5) or 0.0),
        "refusal_p99_ms": None if not refused else 1000 * (pct(refused, 0.99) or 0.0),
        "deadline_504": len(timeouts),
        "other_statuses": other,
        "ok_p99_ms": None if not good else 1000 * (pct([dt for s, dt, _ in results if s == 200], 0.99) or 0.0),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-repo", type=Path, default=None, help="default: the shipped models (the default model serves)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--front-workers", default="0,2", help="server modes to measure, comma-separated")
    ap.add_argument("--deadline", type=float, default=3.0, help="the server's request deadline (VQTOK_REQUEST_TIMEOUT_S)")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each load level")
    ap.add_argument("--levels", default="1,2,4", help="offered load as multiples of the measured capacity")
    ap.add_argument("--burst", type=int, default=64, help="requests sent at once before the levels (0: none)")
    ap.add_argument("--capacity-seconds", type=float, default=20.0)
    ap.add_argument("--capacity-concurrency", type=int, default=16)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--baseline", type=Path, default=None, help="a checkout of the code before admission, measured in the same run")
    ap.add_argument("--images", type=Path, default=PHOTOS_VAL)
    ap.add_argument("--out", type=Path, default=RESULTS / "overload" / "result.json")
    args = ap.parse_args(argv)
    images = load_images(args.images, 64)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    servers = [("admission", REPO)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    result: dict[str, Any] = {
        "question": "goodput and time to refusal under overload: admission by deadline against the code before it",
        **host_fields(),
        "servers": {label: {"checkout": str(path), "revision": git_short(path)} for label, path in servers},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "modes": [],
    }
    rows: list[list[Any]] = []
    for label, checkout in servers:
        for fw in [int(x) for x in args.front_workers.split(",")]:
            proc, url = start_server(args, checkout, fw, args.out.with_suffix(f".{label}.fw{fw}.log"))
            try:
                capacity(url, images, args.capacity_concurrency, 5.0)  # warm: the batcher learns what a batch costs
                cap = capacity(url, images, args.capacity_concurrency, args.capacity_seconds)
                if cap <= 0:
                    raise SystemExit(f"{label} fw={fw}: no request answered in {args.capacity_seconds:g} s; is the machine busy?")
                mode: dict[str, Any] = {"server": label, "front_workers": fw, "capacity_images_per_s": cap, "levels": []}
                result["modes"].append(mode)
                if args.burst:
                    row = summarise(burst(url, images, args.burst), 1.0, args.deadline, cap, 0)
                    row["burst"] = args.burst
                    mode["burst"] = row
                    rows.append(_row(label, fw, f"burst {args.burst}", cap, row))
                    print(rows[-1], flush=True)
                    time.sleep(args.deadline + 1)
                for m in [float(x) for x in args.levels.split(",")]:
                    row = summarise(
                        offer(url, images, m * cap, args.seconds, args.deadline, args.client_procs), args.seconds, args.deadline, cap, m
                    )
                    mode["levels"].append(row)
                    rows.append(_row(label, fw, f"{m:g}x", cap, row))
                    print(rows[-1], flush=True)
                    write_json(args.out, result)
                    time.sleep(args.deadline + 1)  # the last level's queue drains before the next
            finally:
                stop_server(proc)
    write_json(args.out, result)
    headers = [
        "server",
        "fronts",
        "load",
        "capacity/s",
        "offered/s",
        "goodput/s",
        "goodput/capacity",
        "200 in time",
        "503",
        "refusal p50/p99 ms",
        "504",
        "late 200",
    ]
    print(table(headers, rows))
    print(f"wrote {args.out}")
    return 0


def _row(label: str, fw: int, load: str, cap: float, row: dict[str, Any]) -> list[Any]:
    p50, p99 = row["refusal_p50_ms"], row["refusal_p99_ms"]
    refusal = "-" if p50 is None else f"{p50:.0f} / {p99:.0f}"
    burst = load.startswith("burst")
    return [
        label,
        fw,
        load,
        f"{cap:.1f}",
        "-" if burst else f"{row['offered_per_s']:.1f}",
        "-" if burst else f"{row['goodput_per_s']:.1f}",
        "-" if burst else f"{row['goodput_over_capacity']:.2f}",
        row["ok"],
        row["refused_503"],
        refusal,
        row["deadline_504"],
        row["late_200"],
    ]


if __name__ == "__main__":
    sys.exit(main())
