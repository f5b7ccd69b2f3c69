"""How much CPU does the inference process spend per request, without HTTP?

One front's side in this process, the
inference process (`python -m service.multiproc.server inference`) as a split server runs it.

`bench/http_front.py` measures the same process under real HTTP load, but on a small host its fronts
(HTTP, JPEG decoding) take most of the CPU and their noise drowns the inference process's share. Here
this process plays one front: `--concurrency` requests of one already-decoded image each, in a closed
loop, through `RemoteRepository` (the routes' own path: lease, `RemoteBatcher.submit`), for
`--duration` seconds after one of warm-up. It reports the inference process's CPU seconds per request
(all its threads, and its event-loop thread alone), this process's, the batches formed and, where the
inference process counts them, the requests per infer message. The same driver runs against any
revision whose `RemoteBatcher.submit(op, array, deadline)` it can call (run it from that checkout).

    python -m bench.inference_process_cpu --model-repo <tiny fsq4> --concurrency 32,64 --duration 5 --out engine_cpu.json

Committed runs: bench/results/inference_process/
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness.procs import thread_cpu_seconds
from bench.harness.record import REPO, host_fields
from service.metrics import Metrics
from service.multiproc import ipc
from service.multiproc.front import RemoteRepository
from service.settings import Settings


def _process_cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") and 'op="encode"' in line)


def _cpu(engine_pid: int) -> dict[str, float]:
    return {"engine": _process_cpu_seconds(engine_pid), "loop": thread_cpu_seconds(engine_pid), "front": time.process_time()}


async def _level(repo: RemoteRepository, engine_pid: int, images: list[np.ndarray], concurrency: int, seconds: float) -> dict[str, Any]:
    t_end = time.monotonic() + 1.0 + seconds
    done = 0

    async def worker(k: int) -> None:
        nonlocal done
        while (now := time.monotonic()) < t_end:
            async with repo.lease(None) as served:
                await served.batcher.submit("encode", images[k % len(images)], now + 60)
            done += 1
            k += concurrency

    async def measure() -> tuple[int, dict[str, float], int, dict[str, float], str, str]:
        await asyncio.sleep(1.0)
        text0, n0, cpu0 = (await repo.exposition()).decode(), done, _cpu(engine_pid)
        await asyncio.sleep(t_end - time.monotonic())
        n1, cpu1 = done, _cpu(engine_pid)
        return n0, cpu0, n1, cpu1, text0, (await repo.exposition()).decode()

    *_, (n0, cpu0, n1, cpu1, text0, text1) = await asyncio.gather(*(worker(i) for i in range(concurrency)), measure())
    n = max(1, n1 - n0)
    per_request = {k: 1000 * (cpu1[k] - cpu0[k]) / n for k in cpu0}
    delta = lambda name: _metric(text1, name) - _metric(text0, name)  # noqa: E731
    messages = delta("vqtok_infer_message_requests_count")
    return {
        "concurrency": concurrency,
        "requests_per_s": n / seconds,
        "engine_cpu_ms_per_request": per_request["engine"],  # every thread of the inference process, the model's included
        "engine_loop_cpu_ms_per_request": per_request["loop"],  # its event-loop thread alone
        "front_cpu_ms_per_request": per_request["front"],  # this process: the front's side and the load
        "mean_batch": delta("vqtok_batch_size_sum") / max(1.0, delta("vqtok_batch_size_count")),
        "mean_group": delta("vqtok_infer_message_requests_sum") / messages if messages else None,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(
        model_repo=args.model_repo,
        device="cpu",
        warmup_sizes=[args.size],
        front_workers=1,
        max_batch_size=args.max_batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        max_queue_images=4096,
        log_level="warning",
    )
    folder = tempfile.mkdtemp(prefix="vqtok-engine-cpu-")
    socket_path = os.path.join(folder, "inference.sock")
    config = {"settings": settings.model_dump(mode="json"), "socket": socket_path, "server_id": f"bench{os.getpid()}"}
    engine = subprocess.Popen([sys.executable, "-m", "service.multiproc.server", "inference"], stdin=subprocess.PIPE, cwd=REPO)
    assert engine.stdin is not None
    engine.stdin.write(json.dumps(config).encode())
    engine.stdin.close()
    slab = ipc.Slab(f"vqtok-bench{os.getpid()}", 32 * 2**20)
    repo = RemoteRepository(settings, Metrics(), socket_path, slab)
    connecting = asyncio.create_task(repo.load_all())
    try:
        deadline = time.monotonic() + 120
        while repo.not_ready_reason() is not None:
            if time.monotonic() > deadline or engine.poll() is not None:
                raise SystemExit(f"the inference process is not ready: {repo.not_ready_reason()}")
            await asyncio.sleep(0.05)
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (1, args.size, args.size, 3), dtype=np.uint8) for _ in range(256)]
        levels = []
        for c in args.concurrency:
            level = await _level(repo, engine.pid, images, c, args.duration)
            levels.append(level)
            print(
                f"  concurrency {c:4d}: {level['requests_per_s']:7.0f} requests/s  inference process "
                f"{level['engine_cpu_ms_per_request']:.3f} ms/request (loop thread {level['engine_loop_cpu_ms_per_request']:.3f})  "
                f"front {level['front_cpu_ms_per_request']:.3f}  batch {level['mean_batch']:.1f}  group {level['mean_group'] or 0:.1f}",
                flush=True,
            )
        return {
            "setup": {
                **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
                **host_fields(args.revision),
            },
            "levels": levels,
        }
    finally:
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        engine.terminate()
        engine.wait(timeout=60)
        await repo.close()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repo", type=Path, required=True)
    p.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[32, 64])
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per level (after 1 s of warm-up)")
    p.add_argument("--size", type=int, default=32, help="images are size×size (random pixels, already decoded)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-batch-delay-ms", type=float, default=2.0)
    p.add_argument("--revision", default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
