"""Load test of the vqtok service over real HTTP, against the raw runtime in the same run.

Starts its own server (`vqtok serve`, a subprocess bound to 127.0.0.1), sends real 256-px JPEGs as
multipart uploads from several client processes (httpx async, many connections each), sweeps
concurrency, and reports images/s and p50/p95/p99 latency per level. It then runs the raw
`ModelRuntime.encode` in this process on already-decoded batches at the batch size the server formed
at each level, right after that level (server idle), so `http / raw` is the serving overhead
measured under the same conditions.

    python bench/service_load.py --model-repo DIR --device cuda --out $OUT/service_load.json
    python bench/service_load.py --model-repo DIR --soak 10 --out soak.json     # ~80 % of saturation

`--time-budget` bounds the whole run; levels that would not fit are skipped (and listed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VQTOK = [sys.executable, "-c", "import sys; from vqtok.cli import main; sys.exit(main())"]
NPY = "application/x-npy"


# --- the server ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [*VQTOK, "serve", "--model-repo", str(args.model_repo), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--device", args.device, "--max-batch-size", str(args.max_batch_size), "--max-batch-delay-ms", str(args.max_batch_delay_ms)]
    cmd += ["--runtime", args.runtime]
    cmd += ["--batch-workers", str(args.batch_workers), "--decode-threads", str(args.decode_threads), "--log-level", "warning"]
    cmd += ["--max-queue-images", str(max(4096, 4 * max(args.concurrency))), "--warmup-sizes", str(args.warmup_size)]
    if args.precision:
        cmd += ["--precision", args.precision]
    if args.intra_op_threads:
        cmd += ["--intra-op-threads", str(args.intra_op_threads)]
    if args.model:
        cmd += ["--default-model", args.model]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server not ready after 600 s; see {log_path}")


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else float("nan")


def scrape(url: str) -> dict[str, float]:
    """The server's batcher counters (encode, all models) from /metrics, and a split server's infer
    messages (requests per message: `vqtok_infer_message_requests`; absent before grouping: 0)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    names = ("vqtok_batch_size_sum", "vqtok_batch_size_count", "vqtok_queue_wait_seconds_sum", "vqtok_inference_seconds_sum")
    for name in (*names, "vqtok_infer_message_requests_sum", "vqtok_infer_message_requests_count"):
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and 'op="encode"' in line:
                total += float(line.rsplit(" ", 1)[1])
        out[name] = total
    return out


# --- the clients (separate processes, so the load generator is not the bottleneck) ---


class StartGate:
    """One start time for every load-generator process: each measures over the same window.

    Each process used to start its clock when it had started (spawned, numpy imported: up to a second
    or more apart on a busy host), so the windows were staggered and the sum of the processes' counts
    over-stated throughput: in a closed loop, a process measuring while others had not started or had
    already stopped saw less load. (Found on an H200: HTTP reported 1.2-1.4x of what the server's own
    batch counters allowed.) `ready` is called in each process when it is set up, then waits for the
    parent's `open`, which sets one start time (CLOCK_MONOTONIC: the same clock in every process)."""

    def __init__(self, ctx: Any) -> None:
        self._ready = ctx.Semaphore(0)
        self._go = ctx.Event()
        self._at = ctx.Value("d", 0.0)

    def ready(self) -> float:
        """In a client process: say it is ready, wait for the gate, and sleep until the start time; returns it."""
        self._ready.release()
        self._go.wait()
        at = float(self._at.value)
        time.sleep(max(0.0, at - time.monotonic()))
        return at

    def open(self, processes: int, timeout: float = 120.0) -> None:
        """In the parent: once `processes` are ready, start them all 0.1 s from now."""
        deadline = time.monotonic() + timeout
        for _ in range(processes):
            if not self._ready.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise SystemExit(f"a load-generator process was not ready after {timeout:.0f} s")
        self._at.value = time.monotonic() + 0.1
        self._go.set()

    @property
    def start(self) -> float:
        return float(self._at.value)


def _client_proc(
    url: str, files: list[bytes], connections: int, seconds: float, rate: float, per_req: int, resize: str, q: Any, gate: StartGate
) -> None:
    q.put(asyncio.run(_client(url, files, connections, seconds, 1.0, rate, per_req, resize, gate)))


async def _client(
    url: str, files: list[bytes], connections: int, seconds: float, warmup: float, rate: float, per_req: int, resize: str, gate: StartGate
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    images = 0
    t_start = gate.ready()
    t_measure, t_end = t_start + warmup, t_start + warmup + seconds
    interval = connections / rate if rate > 0 else 0.0  # open loop: each connection starts a request every `interval`
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(60)) as client:

        async def worker(i: int) -> None:
            nonlocal images
            k = i
            next_at = time.monotonic() + (interval * i / connections if interval else 0)
            while True:
                if interval:
                    now = time.monotonic()
                    if next_at > now:
                        await asyncio.sleep(next_at - now)
                    next_at += interval
                t0 = time.monotonic()
                if t0 >= t_end:
                    return
                parts = [("images", (f"{k + j}.jpg", files[(k + j) % len(files)], "image/jpeg")) for j in range(per_req)]
                k += per_req * connections
                try:
                    r = await client.post("/v1/encode", files=parts, data={"resize": resize}, headers={"Accept": NPY})
                    status = str(r.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                t1 = time.monotonic()
                if t_measure <= t1 <= t_end:  # throughput = completions inside the measured window
                    if status == "200":
                        latencies.append(t1 - t0)
                        images += per_req
                    else:
                        errors[status] = errors.get(status, 0) + 1

        await asyncio.gather(*(worker(i) for i in range(connections)))
    return {"latencies": latencies, "images": images, "errors": errors}


def collect_clients(
    workers: list[Any],
    q: Any,
    seconds: float,
    url: str,
    before: dict[str, float],
    gate: StartGate,
    warmup: float = 1.0,
    probe: Callable[[], dict[str, float]] | None = None,
) -> tuple[list[dict[str, Any]], np.ndarray, dict[str, int], float, float, dict[str, float]]:
    """Start the load-generator processes together (`gate`), gather their reports and the server's batch
    counters after them: (reports, sorted latencies, errors summed by kind, batches run, images batched,
    metrics scraped after). The metrics scraped after hold `window`: the server's own counters over the
    clients' measured window (scraped at its start and end), a check on the clients' count; and, with
    `probe` (counters such as CPU seconds, read at the window's start and end), each one's rate per second
    over the window under `window["rates"]`."""
    for w in workers:
        w.start()
    gate.open(len(workers))
    time.sleep(max(0.0, gate.start + warmup - time.monotonic()))
    t0, w0, p0 = time.monotonic(), scrape(url), probe() if probe else {}
    time.sleep(max(0.0, gate.start + warmup + seconds - time.monotonic()))
    t1, w1, p1 = time.monotonic(), scrape(url), probe() if probe else {}
    results = [q.get(timeout=seconds + 300) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    after = scrape(url)
    lat = np.array(sorted(x for r in results for x in r["latencies"]))
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    batches = after["vqtok_batch_size_count"] - before["vqtok_batch_size_count"]
    batched = after["vqtok_batch_size_sum"] - before["vqtok_batch_size_sum"]
    after = dict(after)
    after["window"] = window_figures(w0, w1, t1 - t0)  # type: ignore[assignment]
    after["window"]["rates"] = {k: (p1[k] - p0.get(k, 0.0)) / (t1 - t0) for k in p1}  # type: ignore[index]
    return results, lat, errors, batches, batched, after


def window_figures(w0: dict[str, float], w1: dict[str, float], seconds: float) -> dict[str, float | None]:
    """The server's batcher over one window: images batched per second, mean batch, mean inference ms."""
    batches = w1["vqtok_batch_size_count"] - w0["vqtok_batch_size_count"]
    images = w1["vqtok_batch_size_sum"] - w0["vqtok_batch_size_sum"]
    inference = w1["vqtok_inference_seconds_sum"] - w0["vqtok_inference_seconds_sum"]
    return {
        "seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 else None,
        "mean_batch": images / batches if batches else None,
        "mean_inference_ms": 1000 * inference / batches if batches else None,
    }


def run_load(
    url: str, files: list[bytes], concurrency: int, seconds: float, procs: int, resize: str, rate: float = 0.0, per_req: int = 1
) -> dict[str, Any]:
    procs = max(1, min(procs, concurrency))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    before = scrape(url)
    gate = StartGate(ctx)
    workers = [
        ctx.Process(target=_client_proc, args=(url, files, n, seconds, rate * n / concurrency, per_req, resize, q, gate), daemon=True)
        for n in shares
    ]
    results, lat, errors, batches, batched, after = collect_clients(workers, q, seconds, url, before, gate)
    n = sum(r["images"] for r in results)
    return {
        "concurrency": concurrency,
        "images": n,
        "images_per_s": n / seconds,
        "server_window": after["window"],
        "p50_ms": float(np.percentile(lat, 50) * 1000) if len(lat) else None,
        "p95_ms": float(np.percentile(lat, 95) * 1000) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99) * 1000) if len(lat) else None,
        "errors": errors,
        "mean_batch": batched / batches if batches else None,
        "mean_queue_ms": 1000 * (after["vqtok_queue_wait_seconds_sum"] - before["vqtok_queue_wait_seconds_sum"]) / max(batched, 1),
        "mean_inference_ms": 1000 * (after["vqtok_inference_seconds_sum"] - before["vqtok_inference_seconds_sum"]) / max(batches, 1),
    }


# --- the raw runtime, same model, same process tree, already-decoded images ---


def decoded_batch(runtime: Any, files: list[bytes], resize: str, batch: int) -> np.ndarray:
    """The server's own preprocessing (models.core.pixels.prepare), done once, outside the timing."""
    from models.core.pixels import prepare

    f, res = runtime.info.downsample, runtime.info.resolution
    arrays = [prepare(b, downsample=f, resolution=res, resize=resize, max_pixels=1 << 26, max_grid_tokens=1 << 30).pixels for b in files]  # type: ignore[arg-type]
    return np.stack([arrays[i % len(arrays)] for i in range(batch)])


def encode_back_to_back(runtime: Any, x: np.ndarray, seconds: float, callers: int = 1, min_calls: int = 1) -> tuple[int, float]:
    """`runtime.encode(x)` back to back for `seconds` (and at least `min_calls` a thread), from `callers`
    threads at once (1: one call at a time; 2-3: the next batch is staged and queued while one runs, as
    a server with two batch workers or a tokenization job's encode threads do): (images, seconds)."""
    t0 = time.perf_counter()

    def loop() -> int:
        calls = 0
        while time.perf_counter() - t0 < seconds or calls < min_calls:
            runtime.encode(x)
            calls += 1
        return calls * len(x)

    if callers == 1:
        n = loop()
    else:
        with ThreadPoolExecutor(callers) as pool:
            n = sum(pool.map(lambda _: loop(), range(callers)))
    return n, time.perf_counter() - t0


def raw_throughput(runtime: Any, files: list[bytes], resize: str, batch: int, seconds: float, threads: int = 1) -> float:
    """Images/s of `runtime.encode` on full batches of the server's own preprocessing, from `threads`
    callers at once (`encode_back_to_back`)."""
    x = decoded_batch(runtime, files, resize, batch)
    runtime.encode(x)  # warm this shape
    n, dt = encode_back_to_back(runtime, x, seconds, threads, min_calls=3)
    return n / dt


# --- main ---


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repo", type=Path, required=True, help="model repository (or one model directory) to serve")
    p.add_argument("--model", default=None, help="model name (default: the server's default)")
    p.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "photos256" / "val", help="folder of JPEGs")
    p.add_argument("--resize", default="none", choices=["none", "crop", "pad"], help="resize mode sent with every request")
    p.add_argument("--warmup-size", type=int, default=256, help="square size the server warms up (the JPEGs' size)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "fp16"])
    p.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "compiled"], help="server and raw alike")
    p.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16, 64], help="comma-separated levels")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level (after 1 s of warm-up)")
    p.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)), help="load-generator processes")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-batch-delay-ms", type=float, default=2.0)
    p.add_argument("--batch-workers", type=int, default=1)
    p.add_argument("--intra-op-threads", type=int, default=None, help="ONNX Runtime threads (server and raw alike; CPU)")
    p.add_argument("--decode-threads", type=int, default=max(2, min(16, (os.cpu_count() or 2) // 2)))
    p.add_argument("--raw-seconds", type=float, default=3.0, help="seconds of raw runtime timing per batch size")
    p.add_argument("--soak", type=float, default=0.0, metavar="MINUTES", help="after the sweep, hold ~80%% of the best rate this long")
    p.add_argument("--soak-fraction", type=float, default=0.8)
    p.add_argument("--time-budget", type=float, default=540.0, help="seconds for the whole run (server start included)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--server-log", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_begin = time.monotonic()
    left = lambda: args.time_budget - (time.monotonic() - t_begin)  # noqa: E731
    files = read_jpegs(args.images)
    log_path = args.server_log or (args.out.with_suffix(".server.log") if args.out else Path("/tmp/vqtok-service-load.log"))
    t_server = time.monotonic()
    proc, url = start_server(args, log_path)
    result: dict[str, Any] = {"levels": [], "skipped_levels": [], "soak": None, "server_ready_s": round(time.monotonic() - t_server, 1)}
    print(f"  server ready in {result['server_ready_s']} s (load + warm-up)", flush=True)
    try:
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        name = args.model or models["default_model"]
        info = next(m for m in models["models"] if m["name"] == name)
        result["setup"] = {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
            **host_fields(),
            "load_average_at_start": os.getloadavg(),
            "model": name,
            "model_info": info,
            "images": len(files),
        }
        rss_start = rss_mib(proc.pid)
        # The raw runtime lives in this process; it is timed right after each level, while the
        # server sits idle, so both numbers of a ratio are taken under the same machine conditions.
        from models.runtime.choose import load_runtime

        model_dir = args.model_repo / name if (args.model_repo / name).is_dir() else args.model_repo
        runtime = load_runtime(
            model_dir,
            runtime=args.runtime,
            device=args.device,
            precision=args.precision or "auto",
            intra_op_threads=args.intra_op_threads,
            max_batch_size=args.max_batch_size,  # the server's batch buckets, so raw runs the same shapes
        )
        runtime.warmup(
            [(args.warmup_size, args.warmup_size)]
        )  # every shape the server warmed (the compiled runtime compiles nothing later)
        result["runtime_providers"] = runtime.providers
        result["runtime"] = getattr(runtime, "runtime_name", "")
        raw: dict[int, list[float]] = {}
        for c in args.concurrency:
            if left() < args.duration + 2 * args.raw_seconds + 30:
                result["skipped_levels"].append(c)
                continue
            level = run_load(url, files, c, args.duration, args.client_procs, args.resize, per_req=args.images_per_request)
            result["levels"].append(level)
            b = max(1, round(level["mean_batch"] or 1))
            raw.setdefault(b, []).append(raw_throughput(runtime, files, args.resize, b, args.raw_seconds))
            level.update(raw_batch=b, raw_images_per_s=raw[b][-1], http_over_raw=level["images_per_s"] / raw[b][-1])
            print(
                f"  concurrency {c:4d}: {level['images_per_s']:8.1f} img/s  p50 {level['p50_ms'] or 0:7.1f} ms  batch {level['mean_batch'] or 0:5.1f}",
                flush=True,
            )
        if left() > args.raw_seconds + 30:
            raw.setdefault(args.max_batch_size, []).append(
                raw_throughput(runtime, files, args.resize, args.max_batch_size, args.raw_seconds)
            )
        result["raw_images_per_s_by_batch"] = raw
        del runtime
        if args.soak > 0 and result["levels"]:
            best = max(result["levels"], key=lambda lv: lv["images_per_s"])
            rate = args.soak_fraction * best["images_per_s"]
            seconds = min(args.soak * 60, max(0.0, left() - 60))
            rss0 = rss_mib(proc.pid)
            soak = run_load(
                url, files, best["concurrency"], seconds, args.client_procs, args.resize, rate=rate, per_req=args.images_per_request
            )
            rss1 = rss_mib(proc.pid)
            soak.update(target_images_per_s=rate, seconds=seconds, rss_start_mib=rss0, rss_end_mib=rss1, rss_growth=(rss1 - rss0) / rss0)
            result["soak"] = soak
        result["rss_mib"] = {"after_warmup": rss_start, "end": rss_mib(proc.pid)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()

    result["wall_s"] = time.monotonic() - t_begin
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


def print_table(result: dict[str, Any]) -> None:
    s = result.get("setup", {})
    print(
        f"\nvqtok service load: model {s.get('model')} ({s.get('device')}), JPEGs (resize={s.get('resize')}), max batch {s.get('max_batch_size')}"
    )
    print(
        "| concurrency | HTTP img/s | p50 ms | p95 ms | p99 ms | mean batch | queue ms | infer ms | raw img/s (same batch) | HTTP/raw | errors |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for lv in result["levels"]:
        ratio = f"{lv['http_over_raw']:.2f}" if lv.get("http_over_raw") else "-"
        raw = f"{lv['raw_images_per_s']:.1f} (b={lv['raw_batch']})" if lv.get("raw_images_per_s") else "-"
        print(
            f"| {lv['concurrency']} | {lv['images_per_s']:.1f} | {lv['p50_ms'] or 0:.1f} | {lv['p95_ms'] or 0:.1f} | {lv['p99_ms'] or 0:.1f} "
            f"| {lv['mean_batch'] or 0:.1f} | {lv['mean_queue_ms']:.1f} | {lv['mean_inference_ms']:.1f} | {raw} | {ratio} | {lv['errors'] or 0} |"
        )
    if result["skipped_levels"]:
        print(f"skipped (time budget): {result['skipped_levels']}")
    if result.get("soak"):
        sk = result["soak"]
        print(
            f"soak: {sk['seconds'] / 60:.1f} min at {sk['images_per_s']:.1f} img/s (target {sk['target_images_per_s']:.1f}), "
            f"errors {sk['errors'] or 0}, p99 {sk['p99_ms'] or 0:.1f} ms, server RSS {sk['rss_start_mib']:.0f} -> {sk['rss_end_mib']:.0f} MiB "
            f"({100 * sk['rss_growth']:+.1f} %)"
        )


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_jpegs(folder: Path) -> list[bytes]:
    """The bytes of every JPEG in `folder` (sorted by name); exits if there is none."""
    files = [p.read_bytes() for p in sorted(folder.glob("*.jp*g"))]
    if not files:
        raise SystemExit(f"no JPEGs in {folder}")
    return files


def host_fields(revision: str | None = None) -> dict[str, Any]:
    """What every service benchmark's JSON records about where and when it ran. `revision`: the
    measured commit where this copy's .git cannot say (a GPU machine's copy carries a stale one)."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "revision": revision or git_revision(),
    }


if __name__ == "__main__":
    sys.exit(main())
