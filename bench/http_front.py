"""HTTP front against the raw runtime, in one run: is the server's HTTP side holding the model back?

For each `--front-workers` value (0 = today's single process; N = N front processes and one inference
process, service/split.py) it starts `vqtok serve`, sends real JPEGs as multipart uploads (one image
per request, then 8-image requests) from separate load-generator processes at each concurrency, and
records images/s, p50/p99 latency, the batches the server formed and the server's CPU seconds per
request (the whole process tree: supervisor, fronts and inference process). The raw runtime
(`models.runtime.choose.load_runtime`, the server's own choice of runtime) is timed in this process on
already-decoded images at the server's max batch size, at the start and at the end; ratios are to the
better of the two. Prints a table, writes JSON.

GPU (one command; torch 2.11 + CUDA on the host, the serving wheels carried in .whl/ as for
scripts/gpu/ort_benches.sh, the photos in .gpudata/photos256/val; the compiled runtime compiles in
≈ 2 min on the first start, then reuses $VQTOK_CACHE/inductor):

    bash scripts/gpu/serving.sh setup; bash scripts/gpu/serving.sh http 0,8   # wheels from .whl/ into /tmp/site, then:

    python3 bench/http_front.py --model-repo models/pretrained --images .gpudata/photos256/val \
        --device cuda --runtime auto --front-workers 0,8 --concurrency 32,64,128,256 --images-per-request 1,8 \
        --max-batch-size 64 --client-procs 6 --decode-threads 4 --duration 6 --time-budget 540 --out $OUT/http_front_gpu.json

CPU (what bench/results/http_front_cpu.json holds; the tiny test model, so that HTTP is what limits):

    python bench/http_front.py --model-repo .pytest_cache/d/vqtok-test-models/<hash>/fsq4 --resize crop \
        --warmup-size 32 --device cpu --front-workers 0,2 --client-procs 1 --out bench/results/http_front_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.service_load import StartGate, collect_clients, free_port, host_fields, raw_throughput, read_jpegs, scrape  # noqa: E402

VQTOK = [sys.executable, "-c", "import sys; from vqtok.cli import main; sys.exit(main())"]
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stats() -> tuple[dict[int, int], dict[int, float]]:
    """(parent pid, user + system CPU seconds) of every live process, from /proc."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    return parents, times


def process_tree(root: int, parents: dict[int, int] | None = None) -> set[int]:
    """`root` and every live descendant."""
    if parents is None:
        parents = _proc_stats()[0]
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


def tree_cpu_seconds(root: int) -> dict[str, float]:
    """user + system CPU seconds of `root` and every live descendant (from /proc), by role: `engine`
    (the inference process of a split server), `fronts`, `supervisor`, or `server` (single process)."""
    parents, times = _proc_stats()
    tree = process_tree(root, parents)
    out = {"total": 0.0}
    for p in tree:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        role = (
            "engine" if "service.multiproc.server inference" in cmd else "fronts" if "service.multiproc.server front" in cmd else "server"
        )
        if role == "server" and "resource_tracker" in cmd:
            role = "fronts"
        out[role] = out.get(role, 0.0) + times.get(p, 0.0)
        out["total"] += times.get(p, 0.0)
        if role == "engine":  # its event-loop thread (tid = pid): every request passes through it, one at a time
            out["engine_loop"] = _thread_cpu_seconds(p)
    return out


def _thread_cpu_seconds(pid: int, tid: int | None = None) -> float:
    try:
        stat = Path(f"/proc/{pid}/task/{tid or pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# --- the load generator: pre-built HTTP/1.1 requests on raw keep-alive sockets, in separate processes ---
# (httpx was the bottleneck: one process served 130 requests/s at 32 connections and 36/s at 128 on this
# machine, while the server sat mostly idle; this client spends a few tens of microseconds per request)


def cpu_probe(server_pid: int) -> Callable[[], dict[str, float]]:
    """CPU seconds so far of the server's processes by role (`tree_cpu_seconds`) and of the whole host (`host`)."""
    return lambda: {**tree_cpu_seconds(server_pid), "host": host_busy_seconds()}


def host_busy_seconds() -> float:
    """CPU seconds the whole host has spent busy (all cores, /proc/stat: everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / _TICK


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


async def _connection(
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


def _client_proc(
    port: int, requests: list[bytes], first: int, connections: int, step: int, warmup: float, seconds: float, q: Any, gate: StartGate
) -> None:
    async def run() -> dict[str, Any]:
        stats: dict[str, Any] = {"latencies": [], "requests": 0, "errors": {}}
        t_start = gate.ready()  # every process's window is the same (StartGate)
        t_measure, t_end = t_start + warmup, t_start + warmup + seconds
        cpu0 = time.process_time()
        await asyncio.gather(*(_connection(port, requests, first + i, step, t_measure, t_end, stats) for i in range(connections)))
        stats["cpu_s"] = time.process_time() - cpu0  # warm-up included: per request, it is over all requests sent
        stats["sent"] = stats["requests"] + sum(stats["errors"].values())
        return stats

    try:  # the load generator's own CPU is host CPU the server cannot use: keep it small
        import uvloop

        q.put(uvloop.run(run()))
    except ImportError:
        q.put(asyncio.run(run()))


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
        workers.append(ctx.Process(target=_client_proc, args=(port, requests, first, n, concurrency, 1.0, seconds, q, gate), daemon=True))
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
        "mean_group": _mean_group(before, after),
        "mean_queue_ms": 1000 * (after["vqtok_queue_wait_seconds_sum"] - before["vqtok_queue_wait_seconds_sum"]) / max(batched, 1),
        "mean_inference_ms": 1000 * (after["vqtok_inference_seconds_sum"] - before["vqtok_inference_seconds_sum"]) / max(batches, 1),
        "client_cpu_s_per_request": client_cpu,  # the load generator's, approximate (requests in the warm-up second estimated)
    }


def _mean_group(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Requests per infer message the inference process received (a split server whose fronts group them)."""
    messages = after["vqtok_infer_message_requests_count"] - before["vqtok_infer_message_requests_count"]
    return (after["vqtok_infer_message_requests_sum"] - before["vqtok_infer_message_requests_sum"]) / messages if messages else None


def served_batch_workers(url: str, model: str) -> int | None:
    """The batch workers the server runs `model` with, as /v1/models reports them."""
    models = httpx.get(f"{url}/v1/models", timeout=10).json().get("models") or []
    return next((m.get("batch_workers") for m in models if m.get("name") == model), None)


def encode_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vqtok_http_requests_total{") and 'route="/v1/encode"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def start_server(
    args: argparse.Namespace, fronts: int, log_path: Path, batch_workers: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    proc, url = spawn_server(args, fronts, log_path, batch_workers=batch_workers)
    wait_ready(proc, url, log_path)
    return proc, url


def spawn_server(
    args: argparse.Namespace, fronts: int, log_path: Path, env: dict[str, str] | None = None, batch_workers: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`vqtok serve` on a free localhost port with the settings in `args` (not waited for: `wait_ready`);
    `batch_workers`: the server's batches in flight per model (None: its default)."""
    port = free_port()
    cmd = [*VQTOK, "serve", "--model-repo", str(args.model_repo), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--device", args.device, "--runtime", args.runtime, "--max-batch-size", str(args.max_batch_size)]
    cmd += ["--max-batch-delay-ms", str(args.max_batch_delay_ms), "--decode-threads", str(args.decode_threads)]
    cmd += ["--max-queue-images", str(max(4096, 8 * max(args.concurrency) * max(args.images_per_request)))]
    cmd += ["--warmup-sizes", str(args.warmup_size), "--request-timeout-s", "120", "--log-level", "warning"]
    cmd += ["--front-workers", str(fronts)]
    if batch_workers is not None:
        cmd += ["--batch-workers", str(batch_workers)]
    if getattr(args, "compile_mode", "default") != "default":
        cmd += ["--compile-mode", args.compile_mode]
    if args.intra_op_threads:
        cmd += ["--intra-op-threads", str(args.intra_op_threads)]
    if args.model:
        cmd += ["--default-model", args.model]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float = 600) -> None:
    """Until /readyz answers 200; SystemExit if the server exits first or `timeout` seconds pass (killed then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server not ready after {timeout:.0f} s; see {log_path}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repo", type=Path, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "photos256" / "val", help="folder of JPEGs")
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
