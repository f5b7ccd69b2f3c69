"""The HTTP load generator: complete `POST /v1/encode` multipart requests built once, sent on raw
keep-alive sockets from separate processes that all measure over one window (`StartGate`), and the
server's own batch counters read over that same window as a check on the count.

Raw sockets, not an HTTP client library: httpx was the bottleneck (one process sent a few hundred
requests/s at most while the server sat mostly idle); this client spends a few tens of microseconds a
request, and uvloop where it is installed."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .server import mean_group, scrape, window_figures


def read_jpegs(folder: Path) -> list[bytes]:
    """The bytes of every JPEG in `folder` (sorted by name); exits if there is none."""
    files = [p.read_bytes() for p in sorted(folder.glob("*.jp*g"))]
    if not files:
        raise SystemExit(f"no JPEGs in {folder}")
    return files


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


def build_requests(files: list[bytes], per_req: int, resize: str, port: int) -> list[bytes]:
    """One complete `POST /v1/encode` multipart request per starting file (the server answers npy)."""
    boundary = b"vqtokbenchboundary7MA4YWxkTrZu0gW"
    out = []
    for k in range(len(files)):
        parts = [b"--" + boundary + b'\r\nContent-Disposition: form-data; name="resize"\r\n\r\n' + resize.encode() + b"\r\n"]
        for j in range(per_req):
            data = files[(k + j) % len(files)]
            parts.append(
                b"--"
                + boundary
                + b'\r\nContent-Disposition: form-data; name="images"; filename="%d.jpg"\r\n' % (k + j)
                + b"Content-Type: image/jpeg\r\n\r\n"
                + data
                + b"\r\n"
            )
        body = b"".join(parts) + b"--" + boundary + b"--\r\n"
        head = (
            b"POST /v1/encode HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: application/x-npy\r\n" % port
            + b"Content-Type: multipart/form-data; boundary="
            + boundary
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        out.append(head + body)
    return out


async def connection(
    port: int,
    requests: list[bytes],
    start: int,
    step: int,
    t_measure: float,
    t_end: float,
    stats: dict[str, Any],
    *,
    interval: float = 0.0,
    first_at: float = 0.0,
    record: Callable[[float, float, str], None] | None = None,
) -> None:
    """One keep-alive connection: the next request as soon as the last is answered (closed loop), or,
    with `interval`, one request every `interval` seconds from `first_at` (open loop: a late answer makes
    the next requests go at once until the schedule is caught up). `record(t_sent, t_answered, status)`,
    when given, receives every request instead of `stats`."""
    k = start
    reader = writer = None
    next_at = first_at
    while True:
        if interval:
            now = time.monotonic()
            if next_at > now:
                await asyncio.sleep(next_at - now)
            next_at += interval
        t0 = time.monotonic()
        if t0 >= t_end:
            break
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**22)
            assert reader is not None
            writer.write(requests[k % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12].decode()
            length = int(re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            if re.search(rb"(?i)\r\nconnection:\s*close", head):
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            status = type(exc).__name__
            if writer is not None:
                writer.close()
            writer = None
        t1 = time.monotonic()
        k += step
        if record is not None:
            record(t0, t1, status)
        elif t_measure <= t1 <= t_end:
            if status == "200":
                stats["latencies"].append(t1 - t0)
                stats["requests"] += 1
            else:
                stats["errors"][status] = stats["errors"].get(status, 0) + 1
    if writer is not None:
        writer.close()


def client_proc(
    port: int, requests: list[bytes], first: int, connections: int, step: int, warmup: float, seconds: float, q: Any, gate: StartGate
) -> None:
    async def run() -> dict[str, Any]:
        stats: dict[str, Any] = {"latencies": [], "requests": 0, "errors": {}}
        t_start = gate.ready()  # every process's window is the same (StartGate)
        t_measure, t_end = t_start + warmup, t_start + warmup + seconds
        cpu0 = time.process_time()
        await asyncio.gather(*(connection(port, requests, first + i, step, t_measure, t_end, stats) for i in range(connections)))
        stats["cpu_s"] = time.process_time() - cpu0  # warm-up included: per request, it is over all requests sent
        stats["sent"] = stats["requests"] + sum(stats["errors"].values())
        return stats

    try:  # the load generator's own CPU is host CPU the server cannot use: keep it small
        import uvloop

        q.put(uvloop.run(run()))
    except ImportError:
        q.put(asyncio.run(run()))


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


def run_load(
    url: str,
    files: list[bytes],
    concurrency: int,
    seconds: float,
    procs: int,
    resize: str,
    per_req: int = 1,
    probe: Callable[[], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """`concurrency` keep-alive connections, each sending its next request when the last is answered,
    over `procs` processes; images/s and latencies over `seconds` after 1 s of warm-up."""
    port = int(url.rsplit(":", 1)[1])
    requests = build_requests(files, per_req, resize, port)
    procs = max(1, min(procs, concurrency))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    before = scrape(url)
    gate = StartGate(ctx)
    workers, first = [], 0
    for n in shares:
        workers.append(ctx.Process(target=client_proc, args=(port, requests, first, n, concurrency, 1.0, seconds, q, gate), daemon=True))
        first += n
    results, lat, errors, batches, batched, after = collect_clients(workers, q, seconds, url, before, gate, probe=probe)
    n = sum(r["requests"] for r in results) * per_req
    client_cpu = sum(r["cpu_s"] for r in results) / max(1, sum(r["sent"] for r in results)) * (seconds / (seconds + 1.0))
    pct = lambda q: float(np.percentile(lat, q) * 1000) if len(lat) else None  # noqa: E731
    return {
        "concurrency": concurrency,
        "images": n,
        "images_per_s": n / seconds,
        "server_window": after["window"],  # the server's batcher over the same window: a check on the count above
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "errors": errors,
        "mean_batch": batched / batches if batches else None,
        "mean_group": mean_group(before, after),
        "mean_queue_ms": 1000 * (after["vqtok_queue_wait_seconds_sum"] - before["vqtok_queue_wait_seconds_sum"]) / max(batched, 1),
        "mean_inference_ms": 1000 * (after["vqtok_inference_seconds_sum"] - before["vqtok_inference_seconds_sum"]) / max(batches, 1),
        "client_cpu_s_per_request": client_cpu,  # the load generator's, approximate (requests in the warm-up second estimated)
    }
