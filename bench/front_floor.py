"""What is a front's CPU per single-image request made of: the work itself, or the HTTP stack?

The same requests as bench/http_front.py (one 256² JPEG a request, multipart, `Accept: application/x-npy`),
from one load-generator process, against four servers on one uvicorn each (httptools):

  bare      a raw ASGI app that reads the body and answers a fixed npy: uvicorn and asyncio alone
  work      the front's own work in a raw ASGI app: the multipart body parsed (`service.forms`), the image
            prepared (`pixels.prepare`, the model's resolution and resize mode), an npy answer; no framework
  fastapi   that work in one FastAPI route, without middleware or dependencies
  vqtok     `vqtok serve --front-workers 1` on a model: its front process only (the inference process's
            CPU is reported beside it; the engine hop is the front's work the others do not do)

For each, the server process's CPU seconds per request over the measuring window. `vqtok - work` is
what the service's HTTP stack costs beyond the work (routing, middleware, dependencies, the deadline
and disconnect tasks, metrics, the hop to the inference process); `work` is a floor that no rewrite
of the front in Python goes under. Prints a table, writes JSON.

    python -m bench.front_floor --model-repo models/pretrained --out bench/results/front_floor/cpu-DATE/fsq4_crop32.json

Committed runs: bench/results/front_floor/
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request  # at module level: the route's annotation is resolved from these globals

from bench.harness.load import StartGate, build_requests, client_proc, read_jpegs
from bench.harness.record import PHOTOS_VAL, REPO, host_fields
from bench.harness.server import free_port, spawn_server, stop_server, wait_ready

VARIANTS = ("bare", "work", "fastapi", "vqtok")
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# --- the servers (run in a child: `front_floor.py --serve VARIANT`) ---


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _app(variant: str, downsample: int, resolution: int, resize: str) -> Any:
    from models.core import pixels
    from service import forms

    fixed = _npy(np.zeros((1, resolution // downsample, resolution // downsample), np.int32))

    def work(body: bytes, content_type: str) -> bytes:
        form = forms.parse_form(body, content_type, max_files=64, max_fields=16)
        grids = []
        for part in form.files("images"):
            p = pixels.prepare(bytes(part.data), downsample=downsample, resolution=resolution, resize=resize)  # type: ignore[arg-type]
            grids.append(np.zeros((p.pixels.shape[0] // downsample, p.pixels.shape[1] // downsample), np.int32))
        return _npy(np.stack(grids))

    if variant == "fastapi":
        from fastapi import FastAPI, Response

        app = FastAPI()

        @app.post("/v1/encode")
        async def encode(request: Request) -> Response:
            return Response(work(await request.body(), request.headers["content-type"]), media_type="application/x-npy")

        return app

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        answer = fixed if variant == "bare" else work(b"".join(chunks), dict(scope["headers"])[b"content-type"].decode())
        headers = [(b"content-type", b"application/x-npy"), (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return asgi


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    app = _app(args.serve, args.downsample, args.resolution, args.resize)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, http="httptools")


# --- measuring ---


def _load(port: int, requests: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q, gate = ctx.Queue(), StartGate(ctx)
    client = ctx.Process(target=client_proc, args=(port, requests, 0, concurrency, concurrency, 1.0, seconds, q, gate), daemon=True)
    client.start()
    gate.open(1)
    return {"gate": gate, "queue": q, "process": client}


def measure(pids: dict[str, int], port: int, requests: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    """Load the server on `port`; CPU seconds of each of `pids` per request over the measuring window."""
    run = _load(port, requests, concurrency, seconds)
    start = run["gate"].start + 1.0  # the clients' measuring window opens after 1 s of warm-up
    time.sleep(max(0.0, start - time.monotonic()))
    before = {role: cpu_seconds(pid) for role, pid in pids.items()}
    time.sleep(seconds)
    after = {role: cpu_seconds(pid) for role, pid in pids.items()}
    stats = run["queue"].get(timeout=seconds + 120)
    run["process"].join(timeout=30)
    n = stats["requests"]
    if n == 0:
        raise SystemExit(f"no request was answered: {stats['errors']}")
    return {
        "requests_per_s": n / seconds,
        "cpu_ms_per_request": {role: 1000 * (after[role] - before[role]) / n for role in pids},
        "p50_ms": float(np.percentile(stats["latencies"], 50) * 1000),
        "errors": stats["errors"],
    }


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the server did not listen on {port} within {timeout:.0f} s")


def run_variant(variant: str, args: argparse.Namespace, files: list[bytes], info: dict[str, Any]) -> dict[str, Any]:
    if variant == "vqtok":
        ns = argparse.Namespace(
            model_repo=args.model_repo, device="cpu", runtime="auto", max_batch_size=16, max_batch_delay_ms=2.0,
            decode_threads=2, concurrency=[args.concurrency], images_per_request=[1], warmup_size=info["resolution"],
            intra_op_threads=None, model=info["name"],
        )  # fmt: skip
        log = Path(args.out).with_suffix(".server.log") if args.out else Path(os.devnull)
        proc, url = spawn_server(ns, 1, log)
        try:
            wait_ready(proc, url, log)
            port = int(url.rsplit(":", 1)[1])
            kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            roles = {Path(f"/proc/{k}/cmdline").read_text().split("\0")[-2]: int(k) for k in kids}
            if set(roles) != {"front", "inference"}:
                raise SystemExit(f"expected one front and one inference process, found {roles}")
            return measure(
                {"front": roles["front"], "inference process": roles["inference"]},
                port,
                build_requests(files, 1, args.resize, port),
                args.concurrency,
                args.seconds,
            )
        finally:
            stop_server(proc)
    port = free_port()
    cmd = [sys.executable, "-m", "bench.front_floor", "--serve", variant, "--port", str(port), "--resize", args.resize]
    cmd += ["--downsample", str(info["downsample"]), "--resolution", str(info["resolution"])]
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        _wait_port(port, proc)
        return measure({"front": proc.pid}, port, build_requests(files, 1, args.resize, port), args.concurrency, args.seconds)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def model_info(model_repo: Path, name: str | None) -> dict[str, Any]:
    """The model the `vqtok` variant serves (the first in the repository, or `name`): its grid rule."""
    dirs = sorted(d for d in model_repo.iterdir() if (d / "manifest.json").is_file())
    chosen = next((d for d in dirs if d.name == name), None) if name else (dirs[0] if dirs else None)
    if chosen is None:
        raise SystemExit(f"no model {'named ' + name + ' ' if name else ''}in {model_repo}")
    model = json.loads((chosen / "manifest.json").read_text())["model"]
    return {"name": chosen.name, "downsample": model["downsample"], "resolution": model["resolution"]}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repo", type=Path, default=REPO / "models" / "pretrained")
    p.add_argument("--model", help="the model the vqtok variant serves (default: the repository's first)")
    p.add_argument("--images", type=Path, default=PHOTOS_VAL)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--resize", default="crop", choices=("none", "crop", "pad"))
    p.add_argument("--out", type=Path)
    p.add_argument("--serve", choices=VARIANTS[:3], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--downsample", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=int, default=256, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        _serve(args)
        return None
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        p.error(f"unknown variants {sorted(unknown)}")
    info = model_info(args.model_repo, args.model)
    files = read_jpegs(args.images)
    rows = {v: run_variant(v, args, files, info) for v in variants}
    result = {
        "setup": {
            **host_fields(),
            "model": info,
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "resize": args.resize,
            "images": len(files),
        },
        "variants": rows,
    }
    print(
        f"front CPU per single-image request ({info['name']}, {info['resolution']}², resize={args.resize}, c{args.concurrency}, {os.cpu_count()} CPUs)"
    )
    print("| variant | requests/s | p50 ms | server CPU ms / request | errors |")
    print("| --- | ---: | ---: | --- | --- |")
    for v, r in rows.items():
        cpu = ", ".join(f"{role} {ms:.3f}" for role, ms in r["cpu_ms_per_request"].items())
        print(f"| {v} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | {cpu} | {r['errors'] or 0} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
