"""How much CPU does the local engine's driver spend per image, with the model taken out?

The local engine's host side alone: `tokenize_local` with the model replaced by an instant encoder
(`bench.harness.fixtures.InstantEncoder`), and the tokenizing process's own CPU time per image
(all its threads, not the decoding processes'): what the GIL-bound driver must fit in on a many-core
host. Prints a line per pool, writes JSON.

    python -m bench.host_pipeline_cpu --images 6000 --pools process,thread --out host_pipeline.json

Committed runs: bench/results/local_engine_host/
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness.fixtures import InstantEncoder, image_folder
from bench.harness.record import REPO as ROOT
from clients.tokenize.local import tokenize_local
from models.core.artefacts import DEFAULT_MODEL
from models.runtime.onnx import ModelRuntime


def cpu_s(usage: resource.struct_rusage) -> tuple[float, float]:
    return usage.ru_utime, usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "pretrained" / DEFAULT_MODEL)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--pools", default="process", help="comma list of process, thread")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rt = ModelRuntime.load(args.model, device="cpu", max_batch_size=64)
    work = Path(tempfile.mkdtemp())
    rows: list[dict[str, Any]] = []
    try:
        folder = image_folder(work, args.images)
        for pool in args.pools.split(","):
            u0, s0 = cpu_s(resource.getrusage(resource.RUSAGE_SELF))
            c0 = sum(cpu_s(resource.getrusage(resource.RUSAGE_CHILDREN)))
            t0 = time.perf_counter()
            out = work / f"out-{pool}"
            s = tokenize_local(
                folder, out, InstantEncoder(rt), resize="none", batch_size=64, shard_size=1024, progress=False, decode_pool=pool
            )
            wall = time.perf_counter() - t0
            u1, s1 = cpu_s(resource.getrusage(resource.RUSAGE_SELF))
            c1 = sum(cpu_s(resource.getrusage(resource.RUSAGE_CHILDREN)))
            n = max(1, s.images)
            row = {
                "pool": pool,
                "images": s.images,
                "seconds": round(wall, 2),
                "images_per_s": round(s.images / wall, 1),
                "driver_cpu_ms_per_image": round((u1 - u0 + s1 - s0) * 1e3 / n, 3),
                "driver_user_ms_per_image": round((u1 - u0) * 1e3 / n, 3),
                "driver_sys_ms_per_image": round((s1 - s0) * 1e3 / n, 3),
                "decoder_processes_cpu_ms_per_image": round((c1 - c0) * 1e3 / n, 3),
            }
            rows.append(row)
            print(
                f"{pool:8s} {row['images']} images {row['seconds']} s {row['images_per_s']} img/s; driver CPU "
                f"{row['driver_cpu_ms_per_image']} ms/img (user {row['driver_user_ms_per_image']}, sys {row['driver_sys_ms_per_image']}); "
                f"decoding processes {row['decoder_processes_cpu_ms_per_image']} ms/img",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model.name, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
