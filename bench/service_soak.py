"""Does the server hold a fraction of its sustainable rate for minutes, through a reload, without errors or memory growth?

Soak: hold a fraction of the server's sustainable rate for minutes, reloading every model halfway.

Issue 13 item 6: "A 10-minute GPU soak at >= 80 % of the sustainable rate with a model reload in the
middle: 0 errors, GPU and host memory growth < 5 %."

Starts `vqtok serve` (single process, or `--front-workers N`: N fronts + one inference process) with
an admin key, measures the sustainable rate (one closed-loop saturation level at `--concurrency`,
one 256-px JPEG per request, bench.harness.load's raw-socket client), then sends `--fraction` of it
open loop (each connection starts a request every `concurrency / rate` seconds whatever the answers)
for `--minutes`, and at `--reload-at` of the way calls `POST /v1/admin/reload` (every model) while the
load goes on. Recorded: every non-200 answer or broken connection by status (an error: the reload
must not cost any), the achieved rate, p50/p99 per `--window-s` window (the timeline), the reload's
duration and answer (and the server's reload counter before/after), and every `--sample-s` seconds the
host memory of the whole server process tree (RSS and PSS summed over the server and its descendants)
and the GPU memory of those processes (`nvidia-smi --query-compute-apps`; null without nvidia-smi).
Growth = (end - start) / start, start = the first sample after `--warmup-minutes` of the soak (capped
at a fifth of it), end = the last sample under load; the JSON states it. The JSON is rewritten every
sample, so a run cut short still leaves its data.

    python -m bench.service_soak --model-repo models/pretrained --device cuda --front-workers 8 \
        --concurrency 128 --minutes 10 --out $OUT/service_soak.json          # GPU: scripts/gpu/serving_rest.sh
    python -m bench.service_soak --model-repo models/pretrained --device cpu --concurrency 4 \
        --client-procs 1 --minutes 2 --out /tmp/soak_cpu.json                 # CPU, shipped model

Committed runs: bench/results/: soak (CPU) and serving (GPU runs).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import multiprocessing as mp
import os
import queue
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.harness.load import build_requests, connection, read_jpegs, run_load
from bench.harness.procs import tree_memory
from bench.harness.record import PHOTOS_VAL, host_fields
from bench.harness.server import spawn_server, stop_server, wait_ready


def _growth(samples: list[dict[str, Any]], key: str, t_from: float, t_to: float) -> dict[str, Any] | None:
    usable = [s for s in samples if s.get(key) is not None and t_from <= s["t_s"] <= t_to]
    if len(usable) < 2:
        return None
    start, end = usable[0], usable[-1]
    return {
        "start": start[key],
        "end": end[key],
        "start_t_s": start["t_s"],
        "end_t_s": end["t_s"],
        "max": max(s[key] for s in usable),
        "growth": (end[key] - start[key]) / start[key] if start[key] else None,
    }


# --- the open-loop load generator (processes that report every `flush_s` seconds) ---


def _soak_client(
    port: int,
    requests: list[bytes],
    first: int,
    connections: int,
    step: int,
    t_start: float,
    t_end: float,
    interval: float,
    flush_s: float,
    q: Any,
) -> None:
    async def run() -> None:
        done_t, lat = array.array("d"), array.array("d")
        errors: list[tuple[float, float, str]] = []

        def record(t0: float, t1: float, status: str) -> None:
            if status == "200":
                done_t.append(t1)
                lat.append(t1 - t0)
            else:
                errors.append((t0, t1, status))

        def flush(final: bool = False) -> None:
            nonlocal done_t, lat, errors
            q.put({"done_t": done_t, "latency": lat, "errors": errors, "final": final})
            done_t, lat, errors = array.array("d"), array.array("d"), []

        async def flusher() -> None:
            while True:
                await asyncio.sleep(flush_s)
                flush()

        task = asyncio.create_task(flusher())
        stats: dict[str, Any] = {}
        await asyncio.gather(
            *(
                connection(
                    port,
                    requests,
                    first + i,
                    step,
                    t_start,
                    t_end,
                    stats,
                    interval=interval,
                    first_at=t_start + interval * (first + i) / step,  # spread over one interval
                    record=record,
                )
                for i in range(connections)
            )
        )
        task.cancel()
        flush(final=True)

    asyncio.run(run())


class Soak:
    """The soak phase: clients, memory samples, the reload, and the JSON written as it goes."""

    def __init__(
        self, args: argparse.Namespace, proc: subprocess.Popen[bytes], url: str, files: list[bytes], rate: float, key: str
    ) -> None:
        self.args, self.proc, self.url, self.rate, self.key = args, proc, url, rate, key
        self.seconds = args.minutes * 60
        self.warmup_s = min(args.warmup_minutes * 60, self.seconds / 5)
        self.port = int(url.rsplit(":", 1)[1])
        self.requests = build_requests(files, 1, args.resize, self.port)
        self.done_t: list[np.ndarray] = []
        self.latency: list[np.ndarray] = []
        self.errors: list[tuple[float, float, str]] = []
        self.samples: list[dict[str, Any]] = []
        self.reload: dict[str, Any] = {}
        self.t_start = 0.0

    def _do_reload(self) -> None:
        before = reload_counts(self.url)
        t0 = time.monotonic()
        self.reload["started_s"] = round(t0 - self.t_start, 3)
        try:
            r = httpx.post(f"{self.url}/v1/admin/reload", headers={"Authorization": f"Bearer {self.key}"}, timeout=900)
            self.reload["status"] = r.status_code
            try:
                self.reload["response"] = r.json()
            except ValueError:
                self.reload["response"] = r.text[:2000]
        except httpx.HTTPError as exc:
            self.reload["status"] = type(exc).__name__
        self.reload["duration_s"] = round(time.monotonic() - t0, 3)
        after = reload_counts(self.url)
        self.reload["server_reloads_ok"] = {m: after.get(m, 0) - before.get(m, 0) for m in after}
        ok = self.reload["status"] == 200 and isinstance(self.reload.get("response"), dict) and self.reload["response"].get("ok")
        self.reload["ok"] = bool(ok)
        print(f"  reload: {self.reload['status']} in {self.reload['duration_s']:.1f} s ({'ok' if ok else 'FAILED'})", flush=True)

    def _sample(self, now: float) -> None:
        s = {"t_s": round(now - self.t_start, 2), **tree_memory(self.proc.pid)}
        self.samples.append(s)

    def run(self, write: Any) -> dict[str, Any]:
        a = self.args
        procs = max(1, min(a.client_procs, a.concurrency[0]))
        c = a.concurrency[0]
        interval = c / self.rate
        shares = [c // procs + (1 if i < c % procs else 0) for i in range(procs)]
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        self.t_start = time.monotonic() + 3.0  # the client processes start meanwhile
        t_end = self.t_start + self.seconds
        workers, first = [], 0
        for n in shares:
            workers.append(
                ctx.Process(
                    target=_soak_client,
                    args=(self.port, self.requests, first, n, c, self.t_start, t_end, interval, min(a.sample_s, 5.0), q),
                    daemon=True,
                )
            )
            first += n
        for w in workers:
            w.start()
        reload_at = self.t_start + a.reload_at * self.seconds
        reloader: threading.Thread | None = None
        next_sample = self.t_start
        finals, last_print = 0, self.t_start
        while finals < len(workers):
            now = time.monotonic()
            if now > t_end + a.drain_s:
                print(
                    f"  {len(workers) - finals} load-generator process(es) still waiting for answers {a.drain_s:.0f} s after the end",
                    flush=True,
                )
                break
            try:
                msg = q.get(timeout=max(0.05, min(next_sample, reload_at if reloader is None else next_sample) - now))
                self.done_t.append(np.frombuffer(msg["done_t"], dtype=np.float64))
                self.latency.append(np.frombuffer(msg["latency"], dtype=np.float64))
                self.errors += msg["errors"]
                finals += msg["final"]
            except queue.Empty:
                pass
            now = time.monotonic()
            if reloader is None and now >= reload_at:
                reloader = threading.Thread(target=self._do_reload, daemon=True)
                reloader.start()
            if now >= next_sample and now <= t_end + a.sample_s:
                self._sample(now)
                next_sample += a.sample_s
                write(self.summary())
            if now - last_print >= a.window_s and now <= t_end:
                last_print = now
                done = sum(len(d) for d in self.done_t)
                print(f"  t={now - self.t_start:6.0f} s: {done} answered, {len(self.errors)} errors", flush=True)
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.terminate()
        if reloader is not None:
            reloader.join(timeout=900)
        self.finished = finals == len(workers)
        summary = self.summary(final=True)
        summary["memory_after_load"] = {"t_s": round(time.monotonic() - self.t_start, 2), **tree_memory(self.proc.pid)}
        return summary

    def summary(self, final: bool = False) -> dict[str, Any]:
        a = self.args
        done_t = np.concatenate(self.done_t) if self.done_t else np.zeros(0)
        lat = np.concatenate(self.latency) if self.latency else np.zeros(0)
        rel = done_t - self.t_start
        in_soak = (rel >= 0) & (rel <= self.seconds)
        elapsed = min(self.seconds, max(1e-9, time.monotonic() - self.t_start)) if not final else self.seconds
        pct = lambda x, q: round(float(np.percentile(x, q) * 1000), 2) if len(x) else None  # noqa: E731
        by_status: dict[str, int] = {}
        for _, _, s in self.errors:
            by_status[s] = by_status.get(s, 0) + 1
        timeline = []
        for w0 in np.arange(0.0, elapsed, a.window_s):
            w1 = min(w0 + a.window_s, elapsed)
            sel = (rel >= w0) & (rel < w1)
            errs = sum(1 for _, t1, _ in self.errors if w0 <= t1 - self.t_start < w1)
            timeline.append(
                {
                    "from_s": round(float(w0), 1),
                    "to_s": round(float(w1), 1),
                    "answered": int(sel.sum()),
                    "images_per_s": round(float(sel.sum()) / max(w1 - w0, 1e-9), 2),
                    "p50_ms": pct(lat[sel], 50),
                    "p99_ms": pct(lat[sel], 99),
                    "errors": errs,
                }
            )
        during: dict[str, Any] | None = None
        if "duration_s" in self.reload:
            r0 = self.t_start + self.reload["started_s"]
            r1 = r0 + self.reload["duration_s"]
            sel = (done_t >= r0) & (done_t - lat <= r1)  # requests whose time in the server overlapped the reload
            during = {
                "answered": int(sel.sum()),
                "images_per_s": round(float(((done_t >= r0) & (done_t <= r1)).sum()) / max(r1 - r0, 1e-9), 2),
                "p50_ms": pct(lat[sel], 50),
                "p99_ms": pct(lat[sel], 99),
                "max_ms": round(float(lat[sel].max() * 1000), 2) if sel.any() else None,
                "errors": sum(1 for t0, t1, _ in self.errors if t1 >= r0 and t0 <= r1),
            }
        t_to = self.seconds + a.sample_s
        host = _growth(self.samples, "rss_mib", self.warmup_s, t_to)
        pss = _growth(self.samples, "pss_mib", self.warmup_s, t_to)
        gpu = _growth(self.samples, "gpu_mib", self.warmup_s, t_to)
        gpu_total = _growth(self.samples, "gpu_total_used_mib", self.warmup_s, t_to)
        achieved = float(in_soak.sum()) / elapsed
        errors = len(self.errors)
        out: dict[str, Any] = {
            "complete": final and getattr(self, "finished", False),
            "seconds": self.seconds,
            "elapsed_s": round(elapsed, 1),
            "target_images_per_s": round(self.rate, 2),
            "images_per_s": round(achieved, 2),
            "answered": int(in_soak.sum()),
            "p50_ms": pct(lat[in_soak], 50),
            "p99_ms": pct(lat[in_soak], 99),
            "errors": errors,
            "errors_by_status": by_status,
            "reload": self.reload or None,
            "during_reload": during,
            "timeline": timeline,
            "memory_growth": {"host_rss": host, "host_pss": pss, "gpu": gpu, "gpu_total_used": gpu_total},
            "memory_samples": self.samples,
        }
        return out


def reload_counts(url: str) -> dict[str, float]:
    """vqtok_model_reloads_total{result="ok"} by model, from /metrics (a load counts too: the difference is what matters)."""
    out: dict[str, float] = {}
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        if line.startswith("vqtok_model_reloads_total{") and 'result="ok"' in line:
            m = re.search(r'model="([^"]*)"', line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
    return out


# --- main ---


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repo", type=Path, required=True, help="model repository to serve (every model in it is reloaded)")
    p.add_argument("--model", default=None, help="model the load goes to (default: the server's default)")
    p.add_argument("--images", type=Path, default=PHOTOS_VAL, help="folder of JPEGs")
    p.add_argument("--resize", default="none", choices=["none", "crop", "pad"])
    p.add_argument("--warmup-size", type=int, default=256, help="square size the server warms up (the JPEGs' size)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "compiled"])
    p.add_argument("--front-workers", type=int, default=0, help="0 = single process; N = N fronts + one inference process")
    p.add_argument("--concurrency", type=lambda s: [int(s)], default=[64], help="connections, for the saturation level and the soak")
    p.add_argument("--saturation-seconds", type=float, default=8.0, help="measured seconds of the saturation level (after 1 s)")
    p.add_argument("--fraction", type=float, default=0.85, help="soak rate as a fraction of the saturation level's")
    p.add_argument("--required-fraction", type=float, default=0.8, help="the achieved rate must reach this fraction of saturation")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--reload-at", type=float, default=0.5, help="when to reload, as a fraction of the soak")
    p.add_argument("--warmup-minutes", type=float, default=1.0, help="memory growth is measured from here (at most a fifth of the soak)")
    p.add_argument("--window-s", type=float, default=60.0, help="timeline window")
    p.add_argument("--sample-s", type=float, default=10.0, help="memory sample (and JSON write) period")
    p.add_argument("--drain-s", type=float, default=120.0, help="how long to wait for answers after the soak's end")
    p.add_argument("--client-procs", type=int, default=max(1, min(6, (os.cpu_count() or 2) // 2)))
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-batch-delay-ms", type=float, default=2.0)
    p.add_argument("--decode-threads", type=int, default=max(2, min(8, (os.cpu_count() or 2) // 2)))
    p.add_argument("--intra-op-threads", type=int, default=None)
    p.add_argument(
        "--server-env", action="append", default=[], metavar="NAME=VALUE", help="extra environment of the server (e.g. MALLOC_ARENA_MAX=2)"
    )
    p.add_argument("--revision", default=None, help="the measured commit (a GPU machine's copy may carry a stale .git)")
    p.add_argument("--out", type=Path, default=None, help="JSON, rewritten as the run goes")
    p.add_argument("--server-log", type=Path, default=None)
    args = p.parse_args(argv)
    args.images_per_request = [1]  # what spawn_server sizes the queue with
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_begin = time.monotonic()
    files = read_jpegs(args.images)
    out = args.out or Path("/tmp/vqtok-service-soak.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.server_log or out.with_suffix(".server.log")
    log_path.write_bytes(b"")
    result: dict[str, Any] = {
        "setup": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
            "concurrency": args.concurrency[0],
            **host_fields(args.revision),
            "images": len(files),
        },
        "definitions": {
            "errors": "every answer other than 200 and every broken connection during the soak, the reload's time included",
            "images_per_s": "200 answers completed inside the soak window / its length (1 image per request)",
            "growth": "(end - start) / start; start = the first memory sample at or after warmup_s into the soak, "
            "end = the last sample under load (at most sample_s after the soak's end)",
            "host_rss": "VmRSS summed over the server process and all its descendants (shared pages counted once per process)",
            "host_pss": "Pss (smaps_rollup) summed over the same processes (shared pages split between them)",
            "gpu": "nvidia-smi --query-compute-apps used_memory of the server tree's pids (null: no nvidia-smi, or no pid matched)",
            "gpu_total_used": "nvidia-smi --query-gpu memory.used, every process on the device",
            "during_reload": "requests whose time in the server overlapped the reload call",
        },
        "status": "starting",
    }

    def write(soak: dict[str, Any] | None = None) -> None:
        if soak is not None:
            result["soak"] = soak
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        os.replace(tmp, out)

    write()
    key = secrets.token_hex(16)
    env = {**os.environ, **dict(kv.split("=", 1) for kv in args.server_env), "VQTOK_ADMIN_API_KEYS": key}
    t0 = time.monotonic()
    proc, url = spawn_server(args, args.front_workers, log_path, env=env)
    try:
        wait_ready(proc, url, log_path)
        result["server_ready_s"] = round(time.monotonic() - t0, 1)
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        result["setup"]["model"] = args.model or models["default_model"]
        result["setup"]["models"] = [m["name"] for m in models["models"]]
        result["setup"]["runtimes"] = {m["name"]: m.get("runtime") for m in models["models"]}
        result["memory_at_ready"] = tree_memory(proc.pid)
        print(f"  server ready in {result['server_ready_s']} s; models {result['setup']['models']}", flush=True)
        result["status"] = "saturation"
        write()
        sat = run_load(url, files, args.concurrency[0], args.saturation_seconds, args.client_procs, args.resize)
        result["saturation"] = sat
        rate = args.fraction * sat["images_per_s"]
        print(
            f"  saturation at concurrency {args.concurrency[0]}: {sat['images_per_s']:.1f} img/s, p99 {sat['p99_ms'] or 0:.1f} ms, "
            f"errors {sat['errors'] or 0}; soak at {rate:.1f} img/s for {args.minutes} min",
            flush=True,
        )
        if rate <= 0:
            raise SystemExit("the saturation level answered nothing")
        result["status"] = "soak"
        write()
        soak = Soak(args, proc, url, files, rate, key)
        summary = soak.run(write)
        result["soak"] = summary
        result["status"] = "done" if summary["complete"] else "incomplete"
        result["verdict"] = verdict(summary, sat["images_per_s"], args.required_fraction)
        write()
    finally:
        stop_server(proc)
        result["server_exit_code"] = proc.returncode
        result["wall_s"] = round(time.monotonic() - t_begin, 1)
        write()
    print_table(result)
    return 0 if result.get("verdict", {}).get("pass") else 1


def verdict(soak: dict[str, Any], saturation: float, required: float) -> dict[str, Any]:
    """Issue 13 item 6's criteria, one by one (null: not measured here)."""
    g = soak["memory_growth"]
    gpu = g["gpu"] or g["gpu_total_used"]
    checks = {
        "zero_errors": soak["errors"] == 0,
        "reload_ok": bool(soak["reload"] and soak["reload"].get("ok")),
        "rate_fraction_of_saturation": round(soak["images_per_s"] / saturation, 3) if saturation else None,
        "rate_ok": soak["images_per_s"] >= required * saturation,
        "host_rss_growth_ok": g["host_rss"]["growth"] < 0.05 if g["host_rss"] else None,
        "gpu_growth_basis": "server pids" if g["gpu"] else "device total" if g["gpu_total_used"] else None,
        "gpu_growth_ok": gpu["growth"] < 0.05 if gpu else None,
    }
    checks["pass"] = bool(soak["complete"]) and all(v is not False for k, v in checks.items() if k.endswith("_ok") or k == "zero_errors")
    return checks


def print_table(result: dict[str, Any]) -> None:
    s, soak = result["setup"], result.get("soak")
    print(f"\nvqtok soak: model {s.get('model')} ({s['device']}, front_workers {s['front_workers']}), concurrency {s['concurrency']}")
    if not soak:
        print(f"no soak (status {result['status']})")
        return
    sat = result["saturation"]
    print(
        f"saturation {sat['images_per_s']:.1f} img/s; soak {soak['elapsed_s'] / 60:.1f} min at {soak['images_per_s']:.1f} img/s "
        f"(target {soak['target_images_per_s']:.1f}), p50 {soak['p50_ms']} ms, p99 {soak['p99_ms']} ms, errors {soak['errors']} {soak['errors_by_status']}"
    )
    print("| from s | to s | img/s | p50 ms | p99 ms | errors |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for w in soak["timeline"]:
        print(f"| {w['from_s']:.0f} | {w['to_s']:.0f} | {w['images_per_s']:.1f} | {w['p50_ms']} | {w['p99_ms']} | {w['errors']} |")
    r, d = soak["reload"] or {}, soak["during_reload"] or {}
    print(
        f"reload at {r.get('started_s')} s: status {r.get('status')}, {r.get('duration_s')} s, ok {r.get('ok')}; "
        f"during it: {d.get('answered')} answered, p99 {d.get('p99_ms')} ms, max {d.get('max_ms')} ms, errors {d.get('errors')}"
    )
    for k, g in soak["memory_growth"].items():
        if g:
            print(f"memory {k}: {g['start']:.1f} -> {g['end']:.1f} MiB (max {g['max']:.1f}) = {100 * (g['growth'] or 0):+.2f} %")
    print(f"verdict: {result.get('verdict')}")


if __name__ == "__main__":
    sys.exit(main())
