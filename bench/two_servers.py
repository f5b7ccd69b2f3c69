"""Two server processes on one device, each serving two models: do both start and serve?

Issue 13 item 5: "Two models in one server and two server processes on one GPU start and serve."

Starts `--servers` independent `vqtok serve` processes at once (different ports, the same model
repository, so every server holds every model in it; on a GPU host they share GPU 0), records each
one's time to ready, then for `--seconds` sends, to every server and every model at once, encode
requests (one real JPEG, npy tokens back) each followed by a decode of the tokens it got (npy pixels
back), `--connections` loops per server and model. Records status codes, rates and p50/p99 per
(server, model, op), whether both servers give the same tokens for the same image and model, the
host memory of each server's process tree and the GPU memory of its processes (nvidia-smi; null on
CPU). Exit 0 when every server came up with every model and answered every request with 200.

    python -m bench.two_servers --model-repo models/pretrained --device cuda --out $OUT/two_servers.json  # scripts/gpu/serving_rest.sh
    python -m bench.two_servers --model-repo models/pretrained --device cpu --seconds 10 --out /tmp/two_servers_cpu.json

Committed runs: bench/results/: serving (GPU runs) and soak (CPU runs).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.harness.load import read_jpegs
from bench.harness.procs import tree_memory
from bench.harness.record import PHOTOS_VAL, host_fields
from bench.harness.server import spawn_server, stop_server, wait_ready

NPY = "application/x-npy"


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


async def _loop(
    client: httpx.AsyncClient, model: str, files: list[bytes], start: int, step: int, resize: str, t_end: float, stats: dict[str, Any]
) -> None:
    """encode one JPEG, decode the tokens it gave, until `t_end`."""
    k = start
    while time.monotonic() < t_end:
        data = files[k % len(files)]
        k += step
        t0 = time.monotonic()
        try:
            r = await client.post(
                "/v1/encode",
                params={"model": model},
                files={"images": (f"{k}.jpg", data, "image/jpeg")},
                data={"resize": resize},
                headers={"Accept": NPY},
            )
            status = str(r.status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        _count(stats["encode"], status, time.monotonic() - t0)
        if status != "200":
            continue
        tokens = np.load(io.BytesIO(r.content))
        t0 = time.monotonic()
        try:
            r = await client.post("/v1/decode", params={"model": model}, content=_npy(tokens), headers={"Content-Type": NPY, "Accept": NPY})
            status = str(r.status_code)
            if status == "200":
                pixels = np.load(io.BytesIO(r.content))
                if pixels.dtype != np.uint8 or pixels.shape[0] != tokens.shape[0] or pixels.shape[-1] != 3:
                    status = f"bad decode {pixels.dtype} {pixels.shape}"
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        _count(stats["decode"], status, time.monotonic() - t0)


def _count(op: dict[str, Any], status: str, seconds: float) -> None:
    op["status"][status] = op["status"].get(status, 0) + 1
    if status == "200":
        op["latencies"].append(seconds)


async def _load(urls: list[str], models: list[str], files: list[bytes], args: argparse.Namespace) -> dict[tuple[int, str], dict[str, Any]]:
    stats: dict[tuple[int, str], dict[str, Any]] = {
        (i, m): {op: {"status": {}, "latencies": []} for op in ("encode", "decode")} for i in range(len(urls)) for m in models
    }
    t_end = time.monotonic() + args.seconds
    clients = [httpx.AsyncClient(base_url=u, timeout=httpx.Timeout(120), limits=httpx.Limits(max_connections=64)) for u in urls]
    try:
        loops = []
        step = len(urls) * len(models) * args.connections
        n = 0
        for i, c in enumerate(clients):
            for m in models:
                for _ in range(args.connections):
                    loops.append(_loop(c, m, files, n, step, args.resize, t_end, stats[(i, m)]))
                    n += 1
        await asyncio.gather(*loops)
    finally:
        for c in clients:
            await c.aclose()
    return stats


def _tokens(url: str, model: str, data: bytes, resize: str) -> np.ndarray | None:
    r = httpx.post(
        f"{url}/v1/encode",
        params={"model": model},
        files={"images": ("0.jpg", data, "image/jpeg")},
        data={"resize": resize},
        headers={"Accept": NPY},
        timeout=120,
    )
    return np.load(io.BytesIO(r.content)) if r.status_code == 200 else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repo", type=Path, required=True, help="model repository with (at least) two models")
    p.add_argument("--images", type=Path, default=PHOTOS_VAL, help="folder of JPEGs")
    p.add_argument("--resize", default="none", choices=["none", "crop", "pad"])
    p.add_argument("--warmup-size", type=int, default=256)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "compiled"])
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--front-workers", type=int, default=0, help="per server (0 = single process)")
    p.add_argument("--seconds", type=float, default=20.0, help="load duration")
    p.add_argument("--connections", type=int, default=4, help="encode+decode loops per server and model")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-batch-delay-ms", type=float, default=2.0)
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--intra-op-threads", type=int, default=None)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--revision", default=None, help="the measured commit (a GPU machine's copy may carry a stale .git)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.model = None  # every server's own default; the load names the model on each request
    args.concurrency, args.images_per_request = [args.connections * 4], [1]  # what spawn_server sizes the queue with
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_begin = time.monotonic()
    files = read_jpegs(args.images)
    out = args.out or Path("/tmp/vqtok-two-servers.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "setup": {
            **{
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
                if k not in ("out", "model", "concurrency", "images_per_request")
            },
            **host_fields(args.revision),
            "images": len(files),
        },
        "servers": [],
    }
    write = lambda: out.write_text(json.dumps(result, indent=2, default=str) + "\n")  # noqa: E731
    procs: list[tuple[subprocess.Popen[bytes], str, Path]] = []
    try:
        t0 = time.monotonic()
        for i in range(args.servers):
            log_path = out.with_suffix(f".server{i}.log")
            log_path.write_bytes(b"")
            proc, url = spawn_server(args, args.front_workers, log_path)
            procs.append((proc, url, log_path))
            result["servers"].append({"index": i, "url": url, "pid": proc.pid, "log": str(log_path)})
        for (proc, url, log_path), s in zip(procs, result["servers"], strict=True):
            wait_ready(proc, url, log_path, timeout=max(1.0, args.startup_timeout - (time.monotonic() - t0)))
            s["ready_s"] = round(time.monotonic() - t0, 1)  # both started at t0: the later one's wait includes the earlier's
            listing = httpx.get(f"{url}/v1/models", timeout=10).json()
            s["models"] = {
                m["name"]: {"state": m.get("state"), "device": m.get("device"), "runtime": m.get("runtime")} for m in listing["models"]
            }
            s["default_model"] = listing.get("default_model")
            s["memory_at_ready"] = tree_memory(proc.pid)
            print(f"  server {s['index']} ready after {s['ready_s']} s: {s['models']}", flush=True)
        write()
        models = sorted(set.intersection(*(set(s["models"]) for s in result["servers"])))
        result["models"] = models
        urls = [url for _, url, _ in procs]
        stats = asyncio.run(_load(urls, models, files, args))
        for (proc, _, _), s in zip(procs, result["servers"], strict=True):
            s["memory_after_load"] = tree_memory(proc.pid)
        pct = lambda x, q: round(float(np.percentile(x, q) * 1000), 2) if x else None  # noqa: E731
        result["load"] = [
            {
                "server": i,
                "model": m,
                "op": op,
                "status": st["status"],
                "ok": len(st["latencies"]),
                "per_s": round(len(st["latencies"]) / args.seconds, 2),
                "p50_ms": pct(st["latencies"], 50),
                "p99_ms": pct(st["latencies"], 99),
            }
            for (i, m), ops in stats.items()
            for op, st in ops.items()
        ]
        agreement = {}
        for m in models:
            got = [_tokens(u, m, files[0], args.resize) for u in urls]
            ok = [g for g in got if g is not None]
            agreement[m] = float(np.mean(ok[0] == ok[1])) if len(ok) == 2 and ok[0].shape == ok[1].shape else None
        result["token_agreement_across_servers"] = agreement
    finally:
        for proc, _, _ in procs:
            stop_server(proc)
        result["server_exit_codes"] = [p.returncode for p, _, _ in procs]
    statuses = {k for row in result.get("load", []) for k in row["status"]}
    result["checks"] = {
        "every_server_ready": all("ready_s" in s for s in result["servers"]) and len(result["servers"]) == args.servers,
        "two_models_per_server": len(result.get("models", [])) >= 2
        and all(v["state"] == "ready" for s in result["servers"] for v in s["models"].values()),
        "only_200": statuses == {"200"},
        "every_server_model_op_served": bool(result.get("load")) and all(row["ok"] > 0 for row in result["load"]),
    }
    result["pass"] = all(result["checks"].values())
    result["wall_s"] = round(time.monotonic() - t_begin, 1)
    write()
    print_table(result)
    return 0 if result["pass"] else 1


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{len(result['servers'])} servers, models {result.get('models')}, device {result['setup']['device']}")
    for s in result["servers"]:
        mem = s.get("memory_after_load") or s.get("memory_at_ready") or {}
        print(
            f"server {s['index']}: ready after {s.get('ready_s')} s, host RSS {mem.get('rss_mib')} MiB, GPU {mem.get('gpu_mib')} MiB "
            f"(device total {mem.get('gpu_total_used_mib')}), runtimes {[v['runtime'] for v in s.get('models', {}).values()]}"
        )
    print("| server | model | op | ok | per s | p50 ms | p99 ms | statuses |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for row in result.get("load", []):
        print(
            f"| {row['server']} | {row['model']} | {row['op']} | {row['ok']} | {row['per_s']} | {row['p50_ms']} | {row['p99_ms']} | {row['status']} |"
        )
    print(f"token agreement across servers: {result.get('token_agreement_across_servers')}")
    print(f"checks: {result['checks']} -> {'PASS' if result['pass'] else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(main())
