"""Does the server refuse at once what it cannot serve in time, and keep its goodput under overload?

Starts `vqtok serve` (CPU or GPU, one process or `--front-workers N`) with a request deadline, measures its
capacity (images/s answered by a closed loop that keeps its queue full), then offers an open-loop Poisson
load of 1x, 2x and 4x that capacity for `--seconds` each, from client processes of their own. Each
request is one real 256² JPEG from photos256/val (resize=crop). Per level it reports:

- goodput: answers within the deadline, per second, and as a share of the capacity;
- refusals (503): how many, and the p50/p99 time from sending to the refusal;
- 504s: requests the server admitted and then could not finish in time;
- late 200s: answers after the deadline (the client's clock), which count against goodput.

    python bench/overload.py --front-workers 0,2 --deadline 3 --seconds 60 --out bench/results/overload/cpu.json

Prints a table and writes the JSON (machine, revision, settings, every level).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VQTOK = [sys.executable, "-c", "import sys; from vqtok.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, front_workers: int, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [*VQTOK, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", args.device, "--log-level", "warning"]
    cmd += ["--front-workers", str(front_workers), "--request-timeout-s", str(args.deadline)]
    if args.model_repo:
        cmd += ["--model-repo", str(args.model_repo)]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < 600:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server not ready in 600 s")


def load_images(folder: Path, n: int) -> list[bytes]:
    files = sorted(folder.glob("*.jpg"))[:n]
    if not files:
        raise SystemExit(f"no JPEGs in {folder}")
    return [f.read_bytes() for f in files]


# --- the clients (each in a process of its own) ---


def _closed_loop(url: str, images: list[bytes], concurrency: int, seconds: float, out: Any) -> None:
    import asyncio

    import httpx

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
                    i += concurrency

            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        out.put(done)

    asyncio.run(main())


def _open_loop(url: str, images: list[bytes], rate: float, seconds: float, deadline: float, seed: int, out: Any) -> None:
    """Poisson arrivals at `rate` a second; every request is sent when it is due, whatever is in flight."""
    import asyncio

    import httpx

    async def main() -> None:
        rng = random.Random(seed)
        results: list[tuple[int, float, float]] = []  # (status, seconds to the answer, sent at)
        async with httpx.AsyncClient(base_url=url, timeout=deadline + 30, limits=httpx.Limits(max_connections=None)) as c:

            async def one(i: int, sent: float) -> None:
                try:
                    r = await c.post(
                        "/v1/encode", files={"images": ("a.jpg", images[i % len(images)], "image/jpeg")}, data={"resize": "crop"}
                    )
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0
                results.append((status, time.monotonic() - sent, sent))

            tasks = []
            start = time.monotonic()
            t, i = 0.0, 0
            while t < seconds:
                delay = start + t - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, time.monotonic())))
                i += 1
                t += rng.expovariate(rate)
            await asyncio.gather(*tasks)
        out.put(results)

    asyncio.run(main())


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


def revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-repo", type=Path, default=None, help="default: the shipped models")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--front-workers", default="0,2", help="server modes to measure, comma-separated")
    ap.add_argument("--deadline", type=float, default=3.0, help="the server's request deadline (VQTOK_REQUEST_TIMEOUT_S)")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each load level")
    ap.add_argument("--levels", default="1,2,4", help="offered load as multiples of the measured capacity")
    ap.add_argument("--capacity-seconds", type=float, default=20.0)
    ap.add_argument("--capacity-concurrency", type=int, default=16)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "photos256" / "val")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "overload" / "result.json")
    args = ap.parse_args(argv)
    images = load_images(args.images, 64)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    modes = []
    for fw in [int(x) for x in args.front_workers.split(",")]:
        proc, url = start_server(args, fw, args.out.with_suffix(f".fw{fw}.log"))
        try:
            capacity(url, images, args.capacity_concurrency, 5.0)  # warm: the batcher learns what a batch costs
            cap = capacity(url, images, args.capacity_concurrency, args.capacity_seconds)
            levels = []
            for m in [float(x) for x in args.levels.split(",")]:
                results = offer(url, images, m * cap, args.seconds, args.deadline, args.client_procs)
                row = summarise(results, args.seconds, args.deadline, cap, m)
                levels.append(row)
                print(
                    f"front_workers={fw} {m:g}x: offered {row['offered_per_s']:.1f}/s goodput {row['goodput_per_s']:.1f}/s "
                    f"({row['goodput_over_capacity']:.2f} of {cap:.1f}) 503 {row['refused_503']} (p99 {row['refusal_p99_ms'] or 0:.0f} ms) "
                    f"504 {row['deadline_504']} late {row['late_200']}",
                    flush=True,
                )
                time.sleep(args.deadline + 1)  # the last level's queue drains before the next
            modes.append({"front_workers": fw, "capacity_images_per_s": cap, "levels": levels})
        finally:
            proc.terminate()
            proc.wait(60)
    result = {
        "question": "goodput and time to refusal under overload (issue 29)",
        "revision": revision(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "modes": modes,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| front_workers | load | offered/s | goodput/s | goodput / capacity | 503 | refusal p50 / p99 ms | 504 | late 200 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in modes:
        for row in mode["levels"]:
            p50, p99 = row["refusal_p50_ms"], row["refusal_p99_ms"]
            refusal = "-" if p50 is None else f"{p50:.0f} / {p99:.0f}"
            print(
                f"| {mode['front_workers']} | {row['offered_x_capacity']:g}x | {row['offered_per_s']:.1f} | {row['goodput_per_s']:.1f} "
                f"| {row['goodput_over_capacity']:.2f} | {row['refused_503']} | {refusal} | {row['deadline_504']} | {row['late_200']} |"
            )
    caps = ", ".join(f"fw={m['front_workers']}: {m['capacity_images_per_s']:.1f}" for m in modes)
    print(f"capacity (images/s): {caps}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
