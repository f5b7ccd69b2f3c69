"""Which compiled GPU path can serve the shipped tokenizer at the GPU's limit? One run, one GPU.

Measures, on real 256² photos (photos256/val, carried to the GPU machine):
  torch-eager-fp32       Tokenizer.encode / decode, fp32 (TF32 off): the baseline everyone has
  torch-compile-bf16     torch.compile(default), bf16 autocast, channels_last (the issue's best torch path)
  torch-compile-ro-bf16  the same with mode="reduce-overhead" (CUDA graphs), the best at batch 1
  aoti-<prec>-<search>   an AOTInductor package of the export graphs (uint8 NHWC -> int32 tokens, and back)
                         with the network in <prec> (fp32 / tf32 / fp16 / bf16) and the code search
                         <search> (chunked matmul+min, or the fused Triton kernel), replayed as a CUDA graph
For each: images/s at batch 1/16/64 (median of CUDA-event timings), compile seconds, and token
agreement / decoded PSNR against the CPU float32 reference (the parity gate's measure).

  PYTHONUNBUFFERED=1 python -m bench.compiled_probe --images .gpudata/val --out $OUT/probe.json

Writes the JSON after every step (a cut-off run keeps what it measured).

Committed runs: bench/results/compiled_path/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.harness.record import REPO as ROOT
from bench.harness.timing import photo_batch
from models.export.graphs import DecoderGraph, EncoderGraph, images_to_input, output_to_images
from models.tokenizer import Tokenizer

MODEL = ROOT / "models" / "pretrained" / "photo-f8-simvq-16k"
RESULTS: dict[str, Any] = {"rows": [], "errors": []}


def save(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=1) + "\n")


def time_cuda(fn: Callable[[], Any], warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds of one call, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> Callable[[], torch.Tensor]:
    """`fn(example)` captured as a CUDA graph; the returned callable replays it."""
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)

    def replay() -> torch.Tensor:
        graph.replay()
        return static_out

    return replay


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def row(name: str, **fields: Any) -> None:
    RESULTS["rows"].append({"path": name, **fields})
    print(json.dumps({"path": name, **fields}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--variants", default="bf16-fused,fp16-fused,tf32-fused,fp32-fused,bf16-chunked")
    ap.add_argument("--skip-torch-compile", action="store_true")
    ap.add_argument(
        "--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True (cuDNN times its algorithms per shape)"
    )
    ap.add_argument("--dynamic-batch", action="store_true", help="one AOTI package per graph with a dynamic batch axis")
    ap.add_argument(
        "--compile-variants",
        default="",
        help="torch.compile (in process, static shapes, default mode) of the export graphs, replayed as CUDA graphs: e.g. fp16-fused,tf32-fused",
    )
    args = ap.parse_args()
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    RESULTS["cudnn_benchmark"] = args.cudnn_benchmark
    dev = torch.device("cuda")
    batches = [int(b) for b in args.batches.split(",")]
    RESULTS.update(
        gpu=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        revision=subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or "unknown",
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    images = photo_batch(args.images, args.count, 256)  # (N, 256, 256, 3) uint8
    n = len(images)
    tok = Tokenizer.from_pretrained(MODEL).eval().float()

    # --- the CPU float32 reference (the parity gate's) ---
    t = time.perf_counter()
    with torch.no_grad():
        ref_ids = torch.cat([tok.encode(images_to_input(torch.from_numpy(images[i : i + 8]))) for i in range(0, n, 8)])
        ref_img = torch.cat(
            [output_to_images(tok.decoder(tok.quantizer.indices_to_codes(ref_ids[i : i + 8]))) for i in range(0, n, 8)]
        ).numpy()
    RESULTS["reference"] = {"images": n, "seconds": time.perf_counter() - t}
    save(args.out)
    ref_np = ref_ids.numpy()
    tok = tok.to(dev)
    gpu_images = torch.from_numpy(images).to(dev)
    gpu_tokens = ref_ids.to(dev).to(torch.int32)

    def batch_of(x: torch.Tensor, b: int) -> torch.Tensor:
        reps = math.ceil(b / len(x))
        return x.repeat(reps, *([1] * (x.ndim - 1)))[:b].contiguous()

    def agreement(encode: Callable[[torch.Tensor], torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        ids = torch.cat([encode(gpu_images[i : i + 16]) for i in range(0, n, 16)]).cpu().numpy()
        img = torch.cat([decode(gpu_tokens[i : i + 16]) for i in range(0, n, 16)]).cpu().numpy()
        return {"token_agreement": float((ids == ref_np).mean()), "decode_psnr_db": psnr(img, ref_img)}

    def measure(name: str, enc: Callable[[int], Callable[[], Any]], dec: Callable[[int], Callable[[], Any]], **extra: Any) -> None:
        fields: dict[str, Any] = dict(extra)
        for b in batches:
            for part, make in (("encode", enc), ("decode", dec)):
                try:
                    ms = time_cuda(make(b))
                    fields[f"{part}_b{b}_ms"] = ms
                    fields[f"{part}_b{b}_img_s"] = b * 1000.0 / ms
                except Exception as exc:
                    fields[f"{part}_b{b}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row(name, **fields)
        save(args.out)

    # --- what each network precision costs in agreement (eager, chunked fp32 search) ---
    tok_cpu = Tokenizer.from_pretrained(MODEL).eval().float()
    for prec, dtype in (("fp32", torch.float32), ("tf32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        torch.backends.cudnn.allow_tf32 = prec == "tf32"
        eg, dg = EncoderGraph(tok_cpu, dtype).to(dev).eval(), DecoderGraph(tok_cpu, dtype).to(dev).eval()
        with torch.no_grad():
            RESULTS.setdefault("precision_agreement", {})[prec] = agreement(eg, dg)
        print(prec, RESULTS["precision_agreement"][prec], flush=True)
    save(args.out)

    # --- torch baselines ---
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    def eager_enc(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return tok.encode(images_to_input(x))

    def eager_dec(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return output_to_images(tok.decoder(tok.quantizer.indices_to_codes(t)))

    acc = agreement(eager_enc, eager_dec)
    measure(
        "torch-eager-fp32",
        lambda b: lambda x=batch_of(gpu_images, b): eager_enc(x),
        lambda b: lambda t=batch_of(gpu_tokens, b): eager_dec(t),
        **acc,
    )

    if not args.skip_torch_compile:
        tok_cl = tok.to(memory_format=torch.channels_last)
        for mode, label in (("default", "torch-compile-bf16"), ("reduce-overhead", "torch-compile-ro-bf16")):
            try:
                t0 = time.perf_counter()
                enc_c = torch.compile(lambda x: tok_cl.encode(images_to_input(x)), mode=mode, dynamic=False)
                dec_c = torch.compile(
                    lambda t: output_to_images(tok_cl.decoder(tok_cl.quantizer.indices_to_codes(t))), mode=mode, dynamic=False
                )

                def run_enc(x: torch.Tensor, f: Any = enc_c) -> torch.Tensor:
                    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                        return f(x)

                def run_dec(t: torch.Tensor, f: Any = dec_c) -> torch.Tensor:
                    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                        return f(t)

                acc = agreement(run_enc, run_dec)
                measure(
                    label,
                    lambda b, f=run_enc: lambda x=batch_of(gpu_images, b): f(x),
                    lambda b, f=run_dec: lambda t=batch_of(gpu_tokens, b): f(t),
                    compile_s=time.perf_counter() - t0,
                    **acc,
                )
            except Exception as exc:
                RESULTS["errors"].append({"path": label, "error": traceback.format_exc()[-2000:]})
                print(label, "failed:", exc, flush=True)
                save(args.out)

    from models.quantizers.search_op import register

    RESULTS["triton_op"] = register()
    save(args.out)
    dtypes = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

    # --- torch.compile of the export graphs, one static shape per batch size, as CUDA graphs ---
    for variant in [v for v in args.compile_variants.split(",") if v]:
        prec, search = variant.split("-")
        autocast = prec.endswith("a")  # "fp16a": float32 weights, autocast to fp16 (norms stay float32)
        prec = prec.rstrip("a")
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        torch.backends.cudnn.allow_tf32 = prec == "tf32"
        label = f"compile-{variant}"
        try:
            weights = torch.float32 if autocast else dtypes[prec]
            eg = EncoderGraph(tok_cpu, weights, fused=search == "fused").to(dev).eval().to(memory_format=torch.channels_last)
            dg = DecoderGraph(tok_cpu, weights).to(dev).eval().to(memory_format=torch.channels_last)
            enc_c = torch.compile(eg, dynamic=False)
            dec_c = torch.compile(dg, dynamic=False)
            cast = dtypes[prec]

            def enc_run(x: torch.Tensor, f: Any = enc_c, on: bool = autocast, dt: torch.dtype = cast) -> torch.Tensor:
                with torch.no_grad(), torch.autocast("cuda", dt, enabled=on):
                    return f(x)

            def dec_run(t: torch.Tensor, f: Any = dec_c, on: bool = autocast, dt: torch.dtype = cast) -> torch.Tensor:
                with torch.no_grad(), torch.autocast("cuda", dt, enabled=on):
                    return f(t)

            t0 = time.perf_counter()
            acc = agreement(enc_run, dec_run)
            first = time.perf_counter() - t0
            measure(
                label,
                lambda b, f=enc_run: graphed(f, batch_of(gpu_images, b)),
                lambda b, f=dec_run: graphed(f, batch_of(gpu_tokens, b)),
                compile_s_first_shape=first,
                cuda_graph=True,
                **acc,
            )
        except Exception as exc:
            RESULTS["errors"].append({"path": label, "error": traceback.format_exc()[-3000:]})
            print(label, "failed:", exc, flush=True)
            save(args.out)

    # --- AOTInductor packages of the export graphs ---
    workdir = Path(tempfile.mkdtemp(prefix="aoti-"))
    for variant in [v for v in args.variants.split(",") if v]:
        prec, search = variant.split("-")
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        torch.backends.cudnn.allow_tf32 = prec == "tf32"
        label = f"aoti-{variant}" + ("-dyn" if args.dynamic_batch else "")
        try:
            enc_graph = EncoderGraph(tok_cpu, dtypes[prec], fused=search == "fused").to(dev).eval()
            dec_graph = DecoderGraph(tok_cpu, dtypes[prec]).to(dev).eval()
            enc_graph = enc_graph.to(memory_format=torch.channels_last)
            dec_graph = dec_graph.to(memory_format=torch.channels_last)
            runners: dict[tuple[str, int], Any] = {}
            t0 = time.perf_counter()
            shapes = [max(batches)] if args.dynamic_batch else batches
            for b in shapes:
                for part, graph, example in (
                    ("encode", enc_graph, batch_of(gpu_images, b)),
                    ("decode", dec_graph, batch_of(gpu_tokens, b)),
                ):
                    dyn = None
                    if args.dynamic_batch:
                        dyn = ({0: torch.export.Dim("batch", min=1, max=max(batches))},)
                    with torch.no_grad():
                        ep = torch.export.export(graph, (example,), dynamic_shapes=dyn)
                        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(workdir / f"{variant}-{part}-{b}.pt2"))
                    runner = torch._inductor.aoti_load_package(path)
                    for bb in batches if args.dynamic_batch else [b]:
                        runners[(part, bb)] = runner
            compile_s = time.perf_counter() - t0

            def enc_fn(x: torch.Tensor, runners: dict[tuple[str, int], Any] = runners) -> torch.Tensor:
                return runners[("encode", len(x))](x)

            def dec_fn(t: torch.Tensor, runners: dict[tuple[str, int], Any] = runners) -> torch.Tensor:
                return runners[("decode", len(t))](t)

            # agreement at batch 16 chunks: only if 16 is a compiled size
            acc = agreement(enc_fn, dec_fn) if ("encode", 16) in runners else {}
            measure(
                label,
                lambda b: graphed(enc_fn, batch_of(gpu_images, b)),
                lambda b: graphed(dec_fn, batch_of(gpu_tokens, b)),
                compile_s=compile_s,
                cuda_graph=True,
                **acc,
            )
            # without the CUDA graph, at the largest batch: what the graph buys
            b = max(batches)
            x, tt = batch_of(gpu_images, b), batch_of(gpu_tokens, b)
            row(
                label + "-nograph",
                **{f"encode_b{b}_ms": time_cuda(lambda x=x: enc_fn(x)), f"decode_b{b}_ms": time_cuda(lambda t=tt: dec_fn(t))},
            )
            save(args.out)
        except Exception as exc:
            RESULTS["errors"].append({"path": label, "error": traceback.format_exc()[-3000:]})
            print(label, "failed:", exc, flush=True)
            save(args.out)
    RESULTS["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save(args.out)
    print("\npath                              " + "  ".join(f"enc b{b:<3d}   dec b{b:<3d}" for b in batches) + "  tokens  PSNR")
    for r in RESULTS["rows"]:
        cells = "  ".join(
            f"{r.get(f'encode_b{b}_img_s', float('nan')):8.0f} {r.get(f'decode_b{b}_img_s', float('nan')):8.0f}" for b in batches
        )
        print(f"{r['path']:32s}  {cells}  {r.get('token_agreement', float('nan')):.4f}  {r.get('decode_psnr_db', float('nan')):.1f}")


if __name__ == "__main__":
    main()
