"""How fast is the served GPU path against the best PyTorch paths, in one run on one GPU?

Measures the runtime the service picks on a CUDA host (`models.runtime.choose.load_runtime`, runtime=auto:
the compiled runtime), its time to ready (cold Inductor cache, then warm in a second process), its
parity against the CPU float32 reference (the load-time gate's own figures), and images/s at batch
1/16/64 for encode and decode at 256² and 512², next to torch eager fp32 and torch.compile bf16
(autocast, channels_last; modes `--torch-modes`: default and reduce-overhead, i.e. CUDA graphs, unless
told otherwise) on the same GPU in the same run; "best torch" is the fastest of them at each point. Prints a table, writes JSON
(rows by image size: `served["256"]["encode_b64_ms"]`, ...; the summary is at 256², batch 64).

  PYTHONUNBUFFERED=1 python -m bench.serving_gpu --images .gpudata/val --out $OUT/serving_gpu.json [--part runtime|torch|all]

The model is the shipped default (`DEFAULT_MODEL`) unless --model says otherwise. The HTTP sweep
(bench/http_front.py), Ray scaling (bench/ray_scale.py) and the soak (bench/service_soak.py) are
separate steps; scripts/gpu/serving.sh runs them all and merges their figures into the summary.

Committed runs: bench/results/serving/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness.record import REPO as ROOT
from bench.harness.timing import photo_batch
from models.core import gate
from models.core.artefacts import DEFAULT_MODEL

MODEL = ROOT / "models" / "pretrained" / DEFAULT_MODEL


def tile(x: np.ndarray, b: int) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([x] * math.ceil(b / len(x)))[:b])


def time_host(fn: Callable[[], Any], warmup: int = 3, repeats: int = 15) -> float:
    """Median ms of a host-to-host call (numpy in, numpy out: what the service's batcher sees)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def runtime_part(model: Path, sets: dict[int, np.ndarray], batches: list[int], out: dict[str, Any], compile_mode: str = "default") -> None:
    from models.runtime.choose import load_runtime

    t0 = time.perf_counter()
    rt = load_runtime(model, runtime="auto", max_batch_size=max(batches), compile_mode=compile_mode)
    out["compile_mode"] = compile_mode
    out["load_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    rt.warmup([(size, size) for size in sets], batches)
    out["warmup_s"] = time.perf_counter() - t1
    out["runtime"] = rt.runtime_name
    out["precision"] = rt.info.precision
    parity = gate.read_parity_set(model)
    assert parity is not None
    out["gate"] = gate.measure(rt.encode, rt.decode, parity)
    out["served"] = {}
    for size, images in sets.items():
        tokens = rt.encode(images[:16])
        row: dict[str, Any] = {}
        for b in batches:
            x, t = tile(images, b), tile(tokens, b)
            row[f"encode_b{b}_ms"] = time_host(lambda x=x: rt.encode(x))
            row[f"decode_b{b}_ms"] = time_host(lambda t=t: rt.decode(t))
        # the same runtime called from two threads at once (a server's two batch workers, a tokenization
        # job's encode threads): the next batch is staged and queued while one runs
        b = max(batches)
        x, t = tile(images, b), tile(tokens, b)
        row[f"encode_b{b}_2threads_img_s"] = pipelined_img_s(lambda x=x: rt.encode(x), b)
        row[f"decode_b{b}_2threads_img_s"] = pipelined_img_s(lambda t=t: rt.decode(t), b)
        out["served"][str(size)] = row


def pipelined_img_s(fn: Callable[[], Any], batch: int, threads: int = 2, calls: int = 20) -> float:
    """Images/s of `calls` calls per thread from `threads` threads at once (after one warm-up call each)."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: fn(), range(threads)))
        t = time.perf_counter()
        list(pool.map(lambda _: [fn() for _ in range(calls)], range(threads)))
        return threads * calls * batch / (time.perf_counter() - t)


TORCH_MODES = {  # torch.compile mode -> row label
    "default": "torch-compile-bf16",
    "reduce-overhead": "torch-compile-ro-bf16",
    "max-autotune-no-cudagraphs": "torch-compile-mat-bf16",
}


def torch_part(
    model: Path,
    sets: dict[int, np.ndarray],
    batches: list[int],
    out: dict[str, Any],
    modes: list[str],
    write: Callable[[], None] | None = None,
    ops: tuple[str, ...] = ("encode", "decode"),
    device: str = "cuda",
) -> None:
    import torch

    from models.export.compiled import configure_inductor
    from models.export.graphs import images_to_input, output_to_images
    from models.tokenizer import Tokenizer

    configure_inductor()  # the runtime's cache folder: a second call resumes max-autotune's tuning where the first stopped
    dev = torch.device(device)
    tok = Tokenizer.from_pretrained(model).eval().to(dev)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True  # the strongest torch baseline: cuDNN times its algorithms too

    def eager_enc(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return tok.encode(images_to_input(x.to(dev))).cpu().numpy()

    def eager_dec(t: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return output_to_images(tok.decoder(tok.quantizer.indices_to_codes(t.to(dev)))).cpu().numpy()

    cl = tok.to(memory_format=torch.channels_last)
    # every mode × size × batch is one graph of the same two functions: room for all of them
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    paths: list[tuple[str, Callable[[torch.Tensor], np.ndarray], Callable[[torch.Tensor], np.ndarray]]] = [
        ("torch-eager-fp32", eager_enc, eager_dec)
    ]
    for mode in modes:  # each mode its own compiled functions (reduce-overhead: CUDA graphs per shape)
        enc_c = torch.compile(lambda x: cl.encode(images_to_input(x)), dynamic=False, mode=mode)
        dec_c = torch.compile(lambda t: output_to_images(cl.decoder(cl.quantizer.indices_to_codes(t))), dynamic=False, mode=mode)

        def comp_enc(x: torch.Tensor, f: Any = enc_c) -> np.ndarray:
            with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16):
                return f(x.to(dev)).cpu().numpy()

        def comp_dec(t: torch.Tensor, f: Any = dec_c) -> np.ndarray:
            with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16):
                return f(t.to(dev)).cpu().numpy()

        paths.append((TORCH_MODES[mode], comp_enc, comp_dec))

    for label, enc, dec in paths:
        todo = [
            (size, b, op) for size in sets for b in batches for op in ops if f"{op}_b{b}_ms" not in out.get(label, {}).get(str(size), {})
        ]
        if not todo:
            print(f"{label}: in {out.get('revision')}'s file already, kept", flush=True)  # a later call of the same run
            continue
        t0 = time.perf_counter()
        tokens = {size: eager_enc(torch.from_numpy(images[:16])) for size, images in sets.items()}
        for size, b, op in todo:  # each figure written as it comes: a call cut off mid-compile keeps the rest
            if op == "encode":
                x = torch.from_numpy(tile(sets[size], b))
                ms = time_host(lambda x=x, f=enc: f(x))
            else:
                t = torch.from_numpy(tile(tokens[size], b))
                ms = time_host(lambda t=t, f=dec: f(t))
            out.setdefault(label, {}).setdefault(str(size), {})[f"{op}_b{b}_ms"] = ms
            seconds = out.setdefault("torch_seconds", {})
            seconds[label] = round(seconds.get(label, 0.0) + time.perf_counter() - t0, 1)  # compiles included
            t0 = time.perf_counter()
            print(f"{label} {size}² {op} b{b}: {ms:.2f} ms ({seconds[label]} s so far)", flush=True)
            if write is not None:
                write()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--sizes", default="256,512", help="square image sizes (the summary is at 256)")
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--part", choices=("runtime", "torch", "all"), default="all")
    ap.add_argument("--revision", default=None, help="the measured commit (the GPU machine's copy may carry another .git)")
    ap.add_argument(
        "--torch-modes",
        default="default,reduce-overhead",
        help=f"torch.compile modes to measure, of {', '.join(TORCH_MODES)} (max-autotune compiles for minutes a shape)",
    )
    ap.add_argument("--torch-ops", default="encode,decode", help="what the torch rows time (decode alone: max-autotune's long compile)")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script's steps (tiny model), no figures worth keeping")
    ap.add_argument(
        "--compile-mode",
        default="default",
        choices=("default", "max-autotune"),
        help="the served compiled runtime's (max-autotune: minutes a shape on an empty cache; a second call resumes from the cache)",
    )
    args = ap.parse_args()
    ops = tuple(o for o in args.torch_ops.split(",") if o)
    if not ops or set(ops) - {"encode", "decode"}:
        ap.error("--torch-ops: encode, decode or both")
    modes = [m for m in args.torch_modes.split(",") if m]
    if unknown := [m for m in modes if m not in TORCH_MODES]:
        ap.error(f"unknown --torch-modes {unknown}; choose from {', '.join(TORCH_MODES)}")
    batches = [int(b) for b in args.batches.split(",")]
    sets = {int(size): photo_batch(args.images, 64, int(size)) for size in args.sizes.split(",")}
    out: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    import torch

    out.update(
        gpu=torch.cuda.get_device_name(0) if args.device == "cuda" else "none (cpu)",
        torch=torch.__version__,
        revision=args.revision
        or subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        or "unknown",
        cache=os.environ.get("VQTOK_CACHE", ""),
        model=args.model.name,
    )
    if args.part in ("runtime", "all"):
        runtime_part(args.model, sets, batches, out, args.compile_mode)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    if args.part in ("torch", "all"):
        torch_part(
            args.model,
            sets,
            batches,
            out,
            modes,
            write=lambda: args.out.write_text(json.dumps(out, indent=1) + "\n"),
            ops=ops,
            device=args.device,
        )
    torch_rows = [k for k in out if k.startswith("torch-") and isinstance(out[k], dict)]
    rows = {k: out[k] for k in ("served", *torch_rows) if k in out}
    print(f"{'path':22s} {'size':>5s}" + "".join(f"  enc b{b:<3d} dec b{b:<3d}" for b in batches) + "   (images/s, host to host)")
    rate = lambda r, key, b: f"{b * 1000 / r[key]:8.0f}" if key in r else f"{'–':>8s}"  # noqa: E731
    for name, by_size in rows.items():
        for size, r in by_size.items():
            print(f"{name:22s} {size:>5s}" + "".join(f"  {rate(r, f'encode_b{b}_ms', b)} {rate(r, f'decode_b{b}_ms', b)}" for b in batches))
    for size, r in out.get("served", {}).items():
        piped = {k: v for k, v in r.items() if k.endswith("_2threads_img_s")}
        if piped:
            print(
                f"served, two threads calling at once, {size}²: "
                + ", ".join(f"{k.removesuffix('_img_s')} {v:.0f} img/s" for k, v in piped.items())
            )
    at256 = {k: out[k].get("256", {}) for k in ("served", *torch_rows) if k in out}
    timed = {p: [k for k in torch_rows if f"{p}_b64_ms" in at256[k]] for p in ("encode", "decode")}  # a row may lack an op (--torch-ops)
    if all(f"{p}_b64_ms" in at256.get("served", {}) and timed[p] for p in ("encode", "decode")):  # the summary point: 256², batch 64
        best_path = {p: min(timed[p], key=lambda k, p=p: at256[k][f"{p}_b64_ms"]) for p in ("encode", "decode")}
        best = {p: at256[best_path[p]][f"{p}_b64_ms"] for p in ("encode", "decode")}
        ratios = {
            f"{p}_served_over_best_torch_by_size": {
                size: min(out[k][size][f"{p}_b64_ms"] for k in torch_rows if f"{p}_b64_ms" in out[k].get(size, {}))
                / out["served"][size][f"{p}_b64_ms"]
                for size in out["served"]
            }
            for p in ("encode", "decode")
        }
        summary = {
            "revision": out["revision"],
            "gpu": out["gpu"],
            "runtime": out.get("runtime"),
            "model": out.get("model"),
            "encode_served_img_s": 64 * 1000 / at256["served"]["encode_b64_ms"],
            "encode_b1_ms": at256["served"].get("encode_b1_ms"),
            "encode_served_over_best_torch": best["encode"] / at256["served"]["encode_b64_ms"],
            "decode_served_over_best_torch": best["decode"] / at256["served"]["decode_b64_ms"],
            "best_torch_path": best_path,
            **ratios,
            "gpu_token_agreement": out["gate"]["token_agreement"],
            "gpu_decode_psnr_db": out["gate"]["decode_psnr_db"],
            "load_s": out.get("load_s"),
            "warmup_s": out.get("warmup_s"),
            "http_over_raw": None,
            "soak_minutes": None,
            "soak_errors": None,
        }
        out["summary"] = summary
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
