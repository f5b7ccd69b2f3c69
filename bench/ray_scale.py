"""Does the Ray engine scale over GPUs?

In one run on one host: the raw runtime's rate on one GPU, the local
engine on one GPU, the Ray engine with one encoder actor (one GPU) and with one actor per GPU.

    python -m bench.ray_scale --model models/pretrained/photo-f8-simvq-16k-v2 --batch-size 64 --out ray_scale.json
    python -m bench.ray_scale --model DIR --device cpu --images 256 --seconds 3      # a CPU smoke run

The runtime is `models.runtime.choose.load_runtime` (`--runtime auto`: the compiled runtime on a CUDA host
where torch can run it, else ONNX Runtime), loaded here on GPU 0 with the encoder's batch shapes warmed
(which fills the Inductor cache, `$VQTOK_CACHE/inductor`, that the Ray actors then load from). `raw`
is that runtime encoding one already-decoded batch of `--batch-size` photos over and over, measured
before the engines and again after them; the faster of the two is the reference. The engines
tokenize 256-px JPEGs (photos256/val, repeated through a folder of symlinks, so every file is read
and decoded for real) under resize crop:
    local     `tokenize_local` with that same runtime (this process, GPU 0), decoding in processes
    ray_1     `tokenize_ray`, num_actors=1: one encoder actor, one GPU; decoding on every core
    ray_all   `tokenize_ray`, one actor per GPU (num_actors = GPU count; on a CPU host `--cpu-actors`)
Each engine gets about `--seconds` of work at its expected rate (raw × its GPUs), cut to fit
`--time-limit`. A Ray engine's figure counts from the moment Ray is up (the actors' model load
included: `images_per_s`); `steady_images_per_s` counts from the first batch that reached the
driver (the rate a long job runs at). Ratios: ray_1 / raw, ray_all / ray_1, local / raw, each for
both figures. The JSON is rewritten after every step, so a run cut short keeps what it measured.

Committed runs: bench/results/ray_scale/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness.fixtures import image_folder
from bench.harness.record import PHOTOS_VAL, parse_engines, revision
from bench.harness.timing import bench_raw, photo_batch

ENGINES = ("local", "ray_1", "ray_all")


def gpus(device: str) -> list[str]:
    """The names of the CUDA devices this process sees (none with --device cpu or without torch+CUDA)."""
    if device == "cpu":
        return []
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def summary_row(s: Any, wall: float, actors: int | None = None) -> dict[str, Any]:
    row = {
        "images": s.images,
        "errors": s.errors,
        "seconds": wall,
        "images_per_s": s.images / wall,
        "first_result_s": s.first_result_s,
        "steady_images_per_s": s.steady_rows_per_s or s.images / wall,
    }
    if actors is not None:
        row["actors"] = actors
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="exported model directory")
    ap.add_argument("--runtime", choices=("auto", "onnxruntime", "compiled"), default="auto")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)} (raw always runs)")
    ap.add_argument("--seconds", type=float, default=25.0, help="work per engine at its expected rate")
    ap.add_argument("--raw-seconds", type=float, default=8.0, help="each raw measurement")
    ap.add_argument("--images", type=int, default=0, help="images per engine at least (default: what --seconds needs)")
    ap.add_argument("--max-images", type=int, default=200_000)
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--cpu-actors", type=int, default=2, help="ray_all's actors on a host without GPUs")
    ap.add_argument("--time-limit", type=float, default=480, help="seconds for the whole run; engines that would not fit are skipped")
    ap.add_argument("--revision", default=None, help="the measured code's revision (default $VQTOK_REVISION, else git's)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here (rewritten after every step)")
    args = ap.parse_args()
    engines = parse_engines(ap, args.engines, ENGINES)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()

    from clients.tokenize.encoders import RuntimeEncoder, load_encoder_runtime
    from clients.tokenize.local import tokenize_local

    names = gpus(args.device)
    n_gpus = len(names)
    report: dict[str, Any] = {
        "benchmark": "ray_scale",
        "revision": revision(args.revision),
        "machine": {"cpus": os.cpu_count(), "gpus": names, "python": platform.python_version(), "platform": platform.platform()},
        "batch_size": args.batch_size,
        "resize": "crop",
        "requested_runtime": args.runtime,
        "results": {},
        "skipped": [],
    }

    def save() -> None:
        report["total_seconds"] = time.perf_counter() - t_start
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")

    def left() -> float:
        return args.time_limit - (time.perf_counter() - t_start)

    t0 = time.perf_counter()
    runtime = load_encoder_runtime(args.model, runtime=args.runtime, device=args.device, batch_size=args.batch_size, resize="crop")
    info = runtime.info
    report["runtime"] = {
        "name": runtime.runtime_name,
        "kind": getattr(runtime, "runtime_kind", "onnxruntime"),
        "providers": list(runtime.providers),
        "device": runtime.device,
        "load_and_warm_s": time.perf_counter() - t0,
    }
    report["model"] = {"dir": str(args.model), "name": info.name, "precision": info.precision, "resolution": info.resolution}
    print(
        f"runtime {runtime.runtime_name} on {runtime.device} ({', '.join(runtime.providers)}), ready in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    batch = photo_batch(PHOTOS_VAL, args.batch_size, info.resolution, info.downsample)
    raw = bench_raw(runtime, batch, args.raw_seconds)
    report["results"]["raw_start"] = raw
    print(f"raw: {raw['images_per_s']:.1f} img/s (batch {args.batch_size})", flush=True)
    if runtime.device == "cuda":  # the stronger baseline: three callers at once, as the local engine encodes
        piped = bench_raw(runtime, batch, args.raw_seconds, callers=3)
        report["results"]["raw_3_callers"] = piped
        print(f"raw, three callers at once: {piped['images_per_s']:.1f} img/s", flush=True)
    save()

    work = Path(tempfile.mkdtemp(prefix="vqtok-ray-scale-"))
    folders: dict[int, Path] = {}

    def folder_for(units: int) -> Path:
        """Images for an engine of `units` GPUs (or actors): about --seconds of work at raw × units."""
        count = int(max(args.images, 4 * args.batch_size, min(args.max_images, raw["images_per_s"] * units * args.seconds)))
        count = -(-count // args.batch_size) * args.batch_size
        if count not in folders:
            folders[count] = image_folder(work, count)
        return folders[count]

    common: dict[str, Any] = dict(resize="crop", batch_size=args.batch_size, shard_size=args.shard_size, progress=False)
    try:
        for engine in engines:
            units = 1 if engine != "ray_all" else (n_gpus or args.cpu_actors)
            need = args.seconds * 1.6 + (0 if engine == "local" else 45) + args.raw_seconds
            if left() < need:
                print(f"{engine}: skipped ({left():.0f} s left, ~{need:.0f} s needed)", flush=True)
                report["skipped"].append(engine)
                continue
            folder = folder_for(units)
            out = work / f"out-{engine}"
            if engine == "local":
                t0, cpu0, kids0 = time.perf_counter(), time.thread_time(), os.times()
                s = tokenize_local(folder, out, RuntimeEncoder(runtime), **common)
                row = summary_row(s, time.perf_counter() - t0)
                kids1 = os.times()
                # where the driver's time went: its own thread's CPU, waiting for decoded images, waiting for
                # encode results; what is left of the wall is the GIL (the encode threads') and the OS
                row |= {
                    "decode_pool": s.decode_pool,
                    "driver_cpu_s": time.thread_time() - cpu0,
                    "driver_decode_wait_s": s.decode_wait_s,
                    "driver_encode_wait_s": s.encode_wait_s,
                    "process_cpu_s": (kids1.user + kids1.system) - (kids0.user + kids0.system),
                    "decoding_processes_cpu_s": (kids1.children_user + kids1.children_system)
                    - (kids0.children_user + kids0.children_system),
                }
                print(
                    "local: the driver's thread used {driver_cpu_s:.1f} s of CPU and waited {driver_decode_wait_s:.1f} s for decoded "
                    "images and {driver_encode_wait_s:.1f} s for encode results, of {seconds:.1f} s; this process {process_cpu_s:.1f} s "
                    "of CPU, the decoding processes {decoding_processes_cpu_s:.1f} s".format(**row),
                    flush=True,
                )
            else:
                import ray

                from clients.tokenize.ray import tokenize_ray

                if not ray.is_initialized():
                    t0 = time.perf_counter()
                    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
                    report["ray"] = {"version": ray.__version__, "start_s": time.perf_counter() - t0, "resources": ray.cluster_resources()}
                t0 = time.perf_counter()  # Ray's own start (once per cluster) is not the pipeline's cost; the actors' load is
                s = tokenize_ray(
                    folder,
                    out,
                    args.model,
                    runtime=args.runtime,
                    device=args.device,
                    num_actors=units,
                    **common,
                )
                row = summary_row(s, time.perf_counter() - t0, units)
            report["results"][engine] = row
            print(
                f"{engine}: {row['images']} images in {row['seconds']:.1f} s: {row['images_per_s']:.1f} img/s, "
                f"steady {row['steady_images_per_s']:.1f} img/s after {row['first_result_s']:.1f} s to the first batch",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
            save()
        if "ray" in report:
            import ray

            ray.shutdown()
        raw_end = bench_raw(runtime, batch, args.raw_seconds)
        report["results"]["raw_end"] = raw_end
        print(f"raw again: {raw_end['images_per_s']:.1f} img/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = report["results"]
    ref = max(results["raw_start"]["images_per_s"], results.get("raw_end", {}).get("images_per_s", 0.0))
    report["raw_images_per_s"] = ref
    ratios: dict[str, float] = {}
    for key in ("images_per_s", "steady_images_per_s"):
        suffix = "" if key == "images_per_s" else "_steady"
        if "ray_1" in results:
            ratios[f"ray_1/raw{suffix}"] = results["ray_1"][key] / ref
        if "ray_1" in results and "ray_all" in results:
            ratios[f"ray_all/ray_1{suffix}"] = results["ray_all"][key] / results["ray_1"][key]
        if "local" in results:
            ratios[f"local/raw{suffix}"] = results["local"][key] / ref
            if "raw_3_callers" in results:
                ratios[f"local/raw_3_callers{suffix}"] = results["local"][key] / results["raw_3_callers"]["images_per_s"]
    report["ratios"] = ratios
    save()

    print(
        f"\n{info.name} ({info.precision}) on {report['runtime']['name']}, {report['runtime']['device']}; "
        f"{n_gpus} GPU{'s' * (n_gpus != 1)} ({', '.join(sorted(set(names))) or 'none'}), {os.cpu_count()} CPUs; "
        f"256x256 JPEGs cropped to {info.resolution}², batch {args.batch_size}; revision {report['revision']}"
    )
    print(f"{'engine':<10} {'units':>5} {'images':>7} {'seconds':>8} {'images/s':>9} {'steady/s':>9} {'1st batch s':>11}")
    for name in ("raw_start", "raw_3_callers", "raw_end"):
        if name in results:
            r = results[name]
            print(f"{name:<10} {1:>5} {r['images']:>7} {r['seconds']:>8.1f} {r['images_per_s']:>9.1f} {'':>9} {'':>11}")
    for name in ENGINES:
        if name in results:
            r = results[name]
            print(
                f"{name:<10} {r.get('actors', 1):>5} {r['images']:>7} {r['seconds']:>8.1f} {r['images_per_s']:>9.1f} "
                f"{r['steady_images_per_s']:>9.1f} {r['first_result_s']:>11.1f}"
            )
    for k, v in ratios.items():
        print(f"{k:<24} {v:.2f}")
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
