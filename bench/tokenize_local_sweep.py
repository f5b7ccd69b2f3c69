"""Which local-engine settings keep the device fed, and where does the engine's time go?

    python -m bench.tokenize_local_sweep --model DIR --device cuda --batch-size 64 --images 12000 \\
        --variants host:thread,host:process,local:thread:c1,local:thread:c2,local:process:c2

Every variant tokenizes the same folder of 256-px JPEGs (photos256/val repeated through symlinks)
with `clients.tokenize.tokenize_local`; the raw runtime on an already-decoded batch, measured at the
start and the end of the run, is the reference. A variant is `ENGINE:POOL[:cN][:wN][:tN]`:

    ENGINE  local (the model) or host (an encoder that answers at once: the host side's ceiling)
    POOL    thread or process (decode_pool)
    cN      encoder concurrency N (batches in flight; default: RuntimeEncoder's)
    wN      N decoding workers (default: tokenize_local's)
    tN      a runtime with N ORT intra-op threads (default: ORT's)

Per variant: images/s and its ratio to raw; CPU cores busy (this process and its decoding children);
the encoder's mean time per batch in the pipeline (against raw's) and the share of the wall time
during which at least one batch was in the encoder; where the driver thread waited.

Committed runs: bench/results/tokenize/
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness.fixtures import InstantEncoder, image_folder
from bench.harness.record import PHOTOS_VAL, revision, write_json
from bench.harness.timing import bench_raw, photo_batch


@dataclass(frozen=True)
class Variant:
    name: str
    engine: str  # local | host
    pool: str  # thread | process
    concurrency: int | None = None
    workers: int | None = None
    intra_op_threads: int | None = None

    @classmethod
    def parse(cls, text: str) -> Variant:
        engine, pool, *opts = text.split(":")
        if engine not in ("local", "host") or pool not in ("thread", "process"):
            raise ValueError(f"bad variant {text!r}: ENGINE must be local or host, POOL thread or process")
        kw: dict[str, int] = {}
        for opt in opts:
            key = {"c": "concurrency", "w": "workers", "t": "intra_op_threads"}.get(opt[:1])
            if key is None or not opt[1:].isdigit():
                raise ValueError(f"bad option {opt!r} in variant {text!r}")
            kw[key] = int(opt[1:])
        return cls(text, engine, pool, **kw)


class TimedEncoder:
    """Wraps an encoder and records when each batch entered and left it."""

    def __init__(self, inner: Any, concurrency: int | None) -> None:
        self.inner, self.spec, self.decode_pool = inner, inner.spec, inner.decode_pool
        self.concurrency = concurrency or inner.concurrency
        self.spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.inner.encode(pixels)
        t1 = time.perf_counter()
        with self._lock:
            self.spans.append((t0, t1))
        return out

    def busy(self) -> tuple[float, float]:
        """(mean seconds per batch, seconds with at least one batch in the encoder)."""
        if not self.spans:
            return 0.0, 0.0
        spans = sorted(self.spans)
        covered, (start, end) = 0.0, spans[0]
        for s, e in spans[1:]:
            if s > end:
                covered, start, end = covered + end - start, s, e
            else:
                end = max(end, e)
        covered += end - start
        return float(np.mean([e - s for s, e in spans])), covered


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="exported model directory")
    ap.add_argument("--variants", default="host:thread,host:process,local:thread:c1,local:thread:c2,local:process:c1,local:process:c2")
    ap.add_argument("--images", type=int, default=8000, help="images per variant")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--raw-seconds", type=float, default=8.0)
    ap.add_argument("--time-limit", type=float, default=540, help="skip the variants that would start after this many seconds")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    variants = [Variant.parse(v) for v in args.variants.split(",") if v]
    t_start = time.perf_counter()

    import onnxruntime

    from clients.tokenize.encoders import RuntimeEncoder
    from clients.tokenize.local import tokenize_local
    from models.runtime.onnx import ModelRuntime

    runtimes: dict[int | None, Any] = {}

    def runtime_for(threads: int | None) -> Any:
        if threads not in runtimes:
            runtimes[threads] = ModelRuntime.load(args.model, device=args.device, intra_op_threads=threads, max_batch_size=args.batch_size)
        return runtimes[threads]

    runtime = runtime_for(None)
    batch = photo_batch(PHOTOS_VAL, args.batch_size, 256)
    raw = bench_raw(runtime, batch, args.raw_seconds)
    raw_ms = 1000 * args.batch_size / raw["images_per_s"]
    print(f"raw: {raw['images_per_s']:.1f} img/s ({raw_ms:.1f} ms per batch of {args.batch_size}) on {runtime.providers[0]}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="vqtok-sweep-"))
    rows: list[dict[str, Any]] = []
    try:
        folder = image_folder(work, args.images)
        for v in variants:
            if time.perf_counter() - t_start > args.time_limit:
                print(f"{v.name}: skipped (time limit)", flush=True)
                continue
            rt = runtime_for(v.intra_op_threads)
            if v.intra_op_threads is not None:
                rt.encode(batch)  # this runtime's first run (cuDNN algorithm search) is not the pipeline's
            inner = InstantEncoder(rt) if v.engine == "host" else RuntimeEncoder(rt)
            enc = TimedEncoder(inner, v.concurrency)
            out = work / "out"
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            s = tokenize_local(
                folder,
                out,
                enc,
                batch_size=args.batch_size,
                shard_size=1024,
                decode_workers=v.workers,
                decode_pool=v.pool,  # type: ignore[arg-type]
                progress=False,
            )
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            mean_s, covered = enc.busy()
            row = {
                "variant": v.name,
                "images": s.images,
                "errors": s.errors,
                "seconds": wall,
                "images_per_s": s.images / wall,
                "encoder_concurrency": enc.concurrency,
                "cpu_cores_busy": cpu / wall,
                "cpu_ms_per_image": 1000 * cpu / max(1, s.images),
                "encoder_ms_per_batch": 1000 * mean_s,
                "encoder_occupied": covered / wall,
                "driver_waited_for_decode_s": s.decode_wait_s,
                "driver_waited_for_encode_s": s.encode_wait_s,
            }
            rows.append(row)
            print(
                f"{v.name}: {row['images_per_s']:.1f} img/s, {row['images_per_s'] / raw['images_per_s']:.0%} of raw; "
                f"{row['cpu_cores_busy']:.1f} cores; encoder {row['encoder_ms_per_batch']:.1f} ms/batch, occupied {row['encoder_occupied']:.0%}; "
                f"driver waited {s.decode_wait_s:.1f} s decode / {s.encode_wait_s:.1f} s encode of {wall:.1f} s",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
        raw_end = bench_raw(runtime, batch, args.raw_seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = max(raw["images_per_s"], raw_end["images_per_s"])
    for row in rows:
        row["ratio_to_raw"] = row["images_per_s"] / best
    report = {
        "benchmark": "tokenize_local_sweep",
        "model": {"dir": str(args.model), "name": runtime.info.name, "precision": runtime.info.precision},
        "providers": runtime.providers,
        "batch_size": args.batch_size,
        "images_per_variant": args.images,
        "raw": {
            "start_images_per_s": raw["images_per_s"],
            "end_images_per_s": raw_end["images_per_s"],
            "ms_per_batch": 1000 * args.batch_size / best,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "platform": platform.platform(),
        },
        "revision": revision(),
        "variants": rows,
        "total_seconds": time.perf_counter() - t_start,
    }
    print(f"\n{runtime.info.name} ({runtime.info.precision}) on {runtime.providers[0]}, batch {args.batch_size}, {os.cpu_count()} CPUs")
    print(
        f"raw {raw['images_per_s']:.1f} / {raw_end['images_per_s']:.1f} img/s (start / end), {1000 * args.batch_size / best:.1f} ms per batch"
    )
    head = f"{'variant':<26} {'img/s':>8} {'vs raw':>7} {'cores':>6} {'cpu ms/img':>10} {'enc ms/b':>9} {'enc busy':>9} {'wait dec s':>10} {'wait enc s':>10}"
    print(head)
    for r in rows:
        print(
            f"{r['variant']:<26} {r['images_per_s']:>8.1f} {r['ratio_to_raw']:>7.0%} {r['cpu_cores_busy']:>6.1f} {r['cpu_ms_per_image']:>10.2f} "
            f"{r['encoder_ms_per_batch']:>9.1f} {r['encoder_occupied']:>9.0%} {r['driver_waited_for_decode_s']:>10.1f} {r['driver_waited_for_encode_s']:>10.1f}"
        )
    write_json(args.out, report)
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
