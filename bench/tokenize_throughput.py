"""How fast do the tokenization engines (local, Ray, server) run against the raw runtime?

Dataset tokenization throughput: images/s of the local, Ray and server engines on 256-px JPEGs,
against the raw runtime on already-decoded batches (the ceiling), all in one run.

    python -m bench.tokenize_throughput --model DIR --out bench/results/tokenize/cpu-DATE/engines.json
    python -m bench.tokenize_throughput --preset f8-simvq-16k --engines local,ray --time-limit 900

The images are ../shared/data/photos256/val (200 JPEGs) repeated, through a folder of symlinks, so
each engine reads and decodes every file for real. Each engine gets an equal share of --time-limit:
the image count is cut to what the raw rate says fits. The ratio column is engine images/s divided by
raw images/s at the same batch size; the issue asks for local >= 0.8 on the GPU machine.

`host` is a diagnostic, not an engine: the local pipeline (read, decode, batch, write shards) with
the model replaced by an encoder that answers instantly with precomputed token ids, so its images/s
is the ceiling the host side puts on the local engine on this machine.

Committed runs: bench/results/tokenize/
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness.fixtures import InstantEncoder, export_preset, image_folder
from bench.harness.record import PHOTOS_VAL, parse_engines, revision, write_json
from bench.harness.timing import bench_raw, photo_batch

ENGINES = ("raw", "local", "ray", "server", "host")


def start_server(model_dir: Path, batch_size: int, device: str) -> tuple[Any, Any, str]:
    import socket
    import threading

    import httpx
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(
        model_repo=model_dir.parent,
        device=device,  # type: ignore[arg-type]
        warmup_sizes=[256],
        max_batch_size=batch_size,
        log_format="text",
        log_level="warning",
        port=port,
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return server, thread, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not become ready")


def done(engine: str, r: dict[str, Any], raw: dict[str, Any]) -> None:
    """One engine's figure as soon as it is measured (a run cut short still shows it)."""
    print(
        f"{engine}: {r['images']} images in {r['seconds']:.1f} s, {r['images_per_s']:.1f} img/s, {r['images_per_s'] / raw['images_per_s']:.0%} of raw (start)",
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="exported model directory (default: export --preset, untrained)")
    ap.add_argument("--preset", default="f8-simvq-16k", help="preset to export when --model is not given")
    ap.add_argument("--engines", default="local,ray,server", help=f"comma list of {', '.join(ENGINES[1:])} (raw always runs)")
    ap.add_argument("--images", type=int, default=2000, help="images per engine at most (cut to fit the time limit)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument(
        "--decode-pool", choices=("auto", "thread", "process"), default="auto", help="local, host and server engines' image decoding"
    )
    ap.add_argument("--encode-concurrency", type=int, default=None, help="local engine: batches in flight (default: RuntimeEncoder's)")
    ap.add_argument("--time-limit", type=float, default=600, help="seconds for the whole benchmark, roughly")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    engines = parse_engines(ap, args.engines, ENGINES)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    import onnxruntime

    from clients.tokenize.encoders import RuntimeEncoder, ServerEncoder
    from clients.tokenize.local import tokenize_local
    from models.runtime.onnx import ModelRuntime

    work = Path(tempfile.mkdtemp(prefix="vqtok-bench-"))
    try:
        model_dir = args.model or export_preset(args.preset, work / "models")
        runtime = ModelRuntime.load(model_dir, device=args.device, max_batch_size=args.batch_size)
        batch = photo_batch(PHOTOS_VAL, args.batch_size, 256)
        raw = bench_raw(runtime, batch, seconds=min(20.0, args.time_limit / 20))
        per_engine = (args.time_limit - (time.perf_counter() - t_start)) / max(1, len(engines))
        # ~70% of an engine's share goes to tokenizing (the rest: start-up, Ray, the server); never below 2 batches
        count = int(max(2 * args.batch_size, min(args.images, raw["images_per_s"] * per_engine * 0.7)))
        folder = image_folder(work, count)
        results: dict[str, Any] = {"raw": raw}
        common = {"resize": "none", "batch_size": args.batch_size, "shard_size": 1024, "progress": False}
        decoding = {"decode_pool": args.decode_pool}
        info, providers = runtime.info, runtime.providers
        if "host" in engines:
            t0 = time.perf_counter()
            s = tokenize_local(folder, work / "out-host", InstantEncoder(runtime), **decoding, **common)
            wall = time.perf_counter() - t0
            results["host"] = {"images": s.images, "errors": s.errors, "seconds": wall, "images_per_s": s.images / wall}
            done("host", results["host"], raw)
            shutil.rmtree(work / "out-host", ignore_errors=True)
        if "local" in engines:
            t0 = time.perf_counter()
            encoder = RuntimeEncoder(runtime, args.encode_concurrency)
            s = tokenize_local(folder, work / "out-local", encoder, **decoding, **common)
            wall = time.perf_counter() - t0
            results["local"] = {
                "images": s.images,
                "errors": s.errors,
                "seconds": wall,
                "images_per_s": s.images / wall,
                "encoder_concurrency": encoder.concurrency,
                "decode_pool": s.decode_pool,
                "driver_waited_for_decode_s": s.decode_wait_s,
                "driver_waited_for_encode_s": s.encode_wait_s,
            }
            done("local", results["local"], raw)
        del runtime  # free this process's ORT memory arena before Ray actors and the server load their own
        gc.collect()
        for engine in (e for e in engines if e not in ("local", "host")):
            out = work / f"out-{engine}"
            t0 = time.perf_counter()
            if engine == "ray":
                import ray

                from clients.tokenize.ray import tokenize_ray

                ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
                t0 = time.perf_counter()  # Ray start-up (seconds, once per cluster) is not the pipeline's cost
                s = tokenize_ray(folder, out, model_dir, device=args.device, **common)
                ray.shutdown()
            else:
                from clients.client import Client

                server, thread, url = start_server(Path(model_dir), args.batch_size, args.device)
                t0 = time.perf_counter()
                with Client(url, max_retries=5) as client:
                    s = tokenize_local(folder, out, ServerEncoder(client, None, concurrency=4), **decoding, **common)
                server.should_exit = True
                thread.join(60)  # the app, its runtime and their device memory go with the server
                del server, thread
            wall = time.perf_counter() - t0
            results[engine] = {"images": s.images, "errors": s.errors, "seconds": wall, "images_per_s": s.images / wall}
            done(engine, results[engine], raw)
            shutil.rmtree(out, ignore_errors=True)
        # raw again at the end: on a shared machine the load changes during the run; the faster of the
        # two raw figures is the reference, so a ratio is never flattered by a slow raw measurement
        gc.collect()
        try:
            runtime = ModelRuntime.load(model_dir, device=args.device, max_batch_size=args.batch_size)
            raw_end = bench_raw(runtime, batch, seconds=min(20.0, args.time_limit / 20))
            del runtime
        except RuntimeError as exc:  # e.g. device memory still held by an engine's workers: keep the results
            print(f"raw at the end failed ({exc!s:.200}); the start's raw figure is the reference", flush=True)
            raw_end = {"images_per_s": 0.0, "error": str(exc)[:500]}
        results["raw"] = max(raw, raw_end, key=lambda r: r["images_per_s"]) | {
            "raw_start": raw["images_per_s"],
            "raw_end": raw_end["images_per_s"],
        }
        report = {
            "benchmark": "tokenize_throughput",
            "model": {
                "dir": str(model_dir),
                "name": info.name,
                "codebook_size": info.codebook_size,
                "downsample": info.downsample,
                "precision": info.precision,
            },
            "providers": providers,
            "image_size": [256, 256],
            "batch_size": args.batch_size,
            "decode_pool": args.decode_pool,
            "images_per_engine": count,
            "load_average_start": load_start,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "onnxruntime": onnxruntime.__version__,
                "platform": platform.platform(),
            },
            "revision": revision(),
            "load_average_end": os.getloadavg(),
            "results": {k: v | {"ratio_to_raw": v["images_per_s"] / results["raw"]["images_per_s"]} for k, v in results.items()},
            "total_seconds": time.perf_counter() - t_start,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nmodel {info.name} (f={info.downsample}, K={info.codebook_size}, {info.precision}) on {', '.join(providers)}; "
        f"256x256 JPEGs, batch {args.batch_size}, {os.cpu_count()} CPUs"
    )
    print(f"{'engine':<8} {'images':>7} {'seconds':>8} {'images/s':>9} {'vs raw':>7}")
    for name, r in report["results"].items():
        print(f"{name:<8} {r['images']:>7} {r['seconds']:>8.1f} {r['images_per_s']:>9.1f} {r['ratio_to_raw']:>7.0%}")
    if "local" in report["results"]:
        r = report["results"]["local"]
        print(
            f"local engine ({r['decode_pool']} decoding, {r['encoder_concurrency']} batches in flight): "
            f"driver waited {r['driver_waited_for_decode_s']:.1f} s for decoding, "
            f"{r['driver_waited_for_encode_s']:.1f} s for the encoder, of {r['seconds']:.1f} s"
        )
    write_json(args.out, report)
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
