"""A `vqtok serve` subprocess for a benchmark: started on a free localhost port, waited for, stopped;
and the counters its /metrics exposes."""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .record import REPO

VQTOK = [sys.executable, "-c", "import sys; from vqtok.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    args: argparse.Namespace, fronts: int, log_path: Path, batch_workers: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`spawn_server`, then `wait_ready`: (process, base URL)."""
    proc, url = spawn_server(args, fronts, log_path, batch_workers=batch_workers)
    wait_ready(proc, url, log_path)
    return proc, url


def spawn_server(
    args: argparse.Namespace, fronts: int, log_path: Path, env: dict[str, str] | None = None, batch_workers: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`vqtok serve` on a free localhost port (not waited for: `wait_ready`), with `fronts` front
    processes (0: one process) and the settings in `args`: model_repo, model, device, runtime,
    max_batch_size, max_batch_delay_ms, decode_threads, concurrency and images_per_request (lists:
    they size the queue), warmup_size, intra_op_threads, and optionally compile_mode. Its log goes to
    `log_path`; `batch_workers`: the server's batches in flight per model (None: its default)."""
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
    """SIGTERM (a graceful shutdown), then SIGKILL after 90 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()


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


def mean_group(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Requests per infer message the inference process received (a split server whose fronts group them)."""
    messages = after["vqtok_infer_message_requests_count"] - before["vqtok_infer_message_requests_count"]
    return (after["vqtok_infer_message_requests_sum"] - before["vqtok_infer_message_requests_sum"]) / messages if messages else None


def served_batch_workers(url: str, model: str) -> int | None:
    """The batch workers the server runs `model` with, as /v1/models reports them."""
    models = httpx.get(f"{url}/v1/models", timeout=10).json().get("models") or []
    return next((m.get("batch_workers") for m in models if m.get("name") == model), None)


def encode_requests(url: str) -> float:
    """Requests the server has answered on /v1/encode so far (its HTTP counter)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vqtok_http_requests_total{") and 'route="/v1/encode"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
