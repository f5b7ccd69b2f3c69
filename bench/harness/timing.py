"""Timing: a callable's median, a runtime's encode back to back (the "raw" figure every ratio is taken
against), and the decoded batches it runs on."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def median_seconds(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 15, sync: Callable[[], None] | None = None) -> float:
    """Median wall seconds of one call of `fn` after `warmup` calls; `sync` (e.g. torch.cuda.synchronize)
    runs after each call, inside the timing, where `fn` only enqueues work."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def photo_batch(folder: Path, count: int, size: int, downsample: int = 8, resize: str = "crop") -> np.ndarray:
    """`count` photos of `folder` (sorted by name, repeated if there are fewer) through the pixel rule
    (`models.core.pixels.prepare`) at `size`: uint8 (count, size, size, 3) under crop, as the service
    and the engines feed a model."""
    from models.core import pixels

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in pixels.IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"no images in {folder}")
    return np.stack(
        [
            pixels.prepare(files[i % len(files)].read_bytes(), downsample=downsample, resolution=size, resize=resize).pixels  # type: ignore[arg-type]
            for i in range(count)
        ]
    )


def decoded_batch(runtime: Any, files: list[bytes], resize: str, batch: int) -> np.ndarray:
    """`batch` of `files` (JPEG bytes, repeated) through the server's own preprocessing for `runtime`'s
    model (models.core.pixels.prepare), done once, outside any timing."""
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
    callers at once (`encode_back_to_back`), the shape warmed first."""
    x = decoded_batch(runtime, files, resize, batch)
    runtime.encode(x)  # warm this shape
    n, dt = encode_back_to_back(runtime, x, seconds, threads, min_calls=3)
    return n / dt


def bench_raw(runtime: Any, batch: np.ndarray, seconds: float, callers: int = 1) -> dict[str, Any]:
    """Images/s of `runtime.encode(batch)` back to back for `seconds`, from `callers` threads at once (a
    tokenization job's encode threads: 3 on CUDA, whose calls overlap on the device), as a record."""
    runtime.encode(batch)  # warm-up (allocations, cuDNN algorithm search)
    n, dt = encode_back_to_back(runtime, batch, seconds, callers)
    return {"images": n, "seconds": dt, "images_per_s": n / dt, "callers": callers}
