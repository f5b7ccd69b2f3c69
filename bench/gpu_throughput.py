"""How fast does ONNX Runtime (the torch-free serving install) encode and decode against torch, on one device?

Paths (all on the same weights, same inputs, same run):
  torch-fp32      eager float32
  torch-bf16      eager, bf16 autocast on the networks (quantizer search stays float32)
  torch-compile   torch.compile(dynamic=True) of the bf16 path
  ort-fp32        ONNX Runtime CUDA EP, fp32 graphs, IO binding with device-resident input/output
  ort-fp16        ONNX Runtime CUDA EP, fp16 graphs (quantizer in float32), IO binding
  ort-fp16-host   the served path as the runtime runs it: numpy in, numpy out (H2D + D2H included)
Each row: images/s (median of timed repeats after warm-up), achieved TFLOP/s from the counted
network FLOPs, % of the measured bf16 matmul peak, and ratios to torch eager and the best torch path.

  python -m bench.gpu_throughput --out results.json                  # GPU machine, full sweep
  python -m bench.gpu_throughput --device cpu --quick --out cpu.json # CPU: ORT CPU vs torch CPU

Committed runs: bench/results/ort_vs_torch/
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.export.driver import export_model, git_revision
from models.export.graphs import DecoderGraph, EncoderGraph
from models.presets import create_tokenizer


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, min_seconds: float, warmup: int = 3, max_iters: int = 50) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < max_iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak_tflops(device: str) -> float:
    if device != "cuda":
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, "cuda", 1.0, warmup=5)
    return 2 * n**3 / t / 1e12


def count_flops(module: torch.nn.Module, example: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(example)
    return float(counter.get_total_flops())


class TorchPaths:
    """Torch encode/decode on the same graphs ORT runs (uint8 in, int32 out and back)."""

    def __init__(self, tok: torch.nn.Module, device: str) -> None:
        self.enc = EncoderGraph(tok, half=False).to(device).eval()  # type: ignore[arg-type]
        self.dec = DecoderGraph(tok, half=False).to(device).eval()  # type: ignore[arg-type]
        self.device = device

    def encode(self, images: torch.Tensor, bf16: bool) -> torch.Tensor:
        from models.export.graphs import images_to_input

        with torch.no_grad():
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=bf16):
                z = self.enc.encoder(images_to_input(images))
            return self.enc.quant.indices(z.float())

    def decode(self, tokens: torch.Tensor, bf16: bool) -> torch.Tensor:
        from models.export.graphs import output_to_images

        with torch.no_grad():
            codes = self.dec.quant.codes(tokens)
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=bf16):
                y = self.dec.decoder(codes)
            return output_to_images(y.float())


def ort_session(path: Path, device: str, nhwc: bool = False) -> Any:
    import onnxruntime as ort

    from models.runtime.onnx import cuda_provider_options, session_options

    providers: list[Any] = ["CPUExecutionProvider"]
    if device == "cuda":
        extra = {"prefer_nhwc": "1"} if nhwc else {}
        providers = [("CUDAExecutionProvider", cuda_provider_options(extra)), "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), session_options(None), providers=providers)


def ort_device_runner(session: Any, input_name: str, array: np.ndarray, device: str) -> Callable[[], Any]:
    """Input already on the device, output left on the device: the engine alone."""
    import onnxruntime as ort

    if device != "cuda":
        return lambda: session.run(None, {input_name: array})
    value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input(input_name, value)
    binding.bind_output(session.get_outputs()[0].name, "cuda")

    def run() -> Any:
        session.run_with_iobinding(binding)

    return run


def bench_model(
    preset: str,
    device: str,
    sizes: list[int],
    batches: list[int],
    min_seconds: float,
    peak: float,
    compile_: bool,
    rows: list[dict[str, Any]],
    on_row: Callable[[], None],
    deadline: float,
) -> None:
    """Appends one row per (size, batch, path, direction) to `rows`, calling `on_row` after each so
    a run cut short still leaves its results; shapes not started by `deadline` are recorded as skipped."""
    torch.manual_seed(0)
    tok = create_tokenizer(preset).eval()
    with tempfile.TemporaryDirectory() as tmp:
        d = tok.save_pretrained(Path(tmp) / preset)
        t0 = time.perf_counter()
        export_model(d, fp16=True)
        print(f"[{preset}] exported in {time.perf_counter() - t0:.0f}s", flush=True)
        f = tok.downsample
        tp = TorchPaths(tok, "cpu")
        tp.enc.to(device)
        tp.dec.to(device)
        tp.device = device
        compiled_enc = torch.compile(lambda x: tp.encode(x, True), dynamic=True) if compile_ else None
        compiled_dec = torch.compile(lambda t: tp.decode(t, True), dynamic=True) if compile_ else None
        sessions = {
            "ort-fp32": (ort_session(d / "encoder.onnx", device), ort_session(d / "decoder.onnx", device)),
            "ort-fp16": (ort_session(d / "encoder.fp16.onnx", device), ort_session(d / "decoder.fp16.onnx", device)),
        }
        rng = np.random.default_rng(0)
        for size in sizes:
            enc_flops = count_flops(tp.enc.encoder, torch.zeros(1, 3, size, size, device=device))
            dec_flops = count_flops(tp.dec.decoder, torch.zeros(1, tok.config.latent_dim, size // f, size // f, device=device))
            for batch in batches:
                if time.monotonic() > deadline:
                    rows.append({"preset": preset, "size": size, "batch": batch, "skipped": "time budget"})
                    print(f"  {preset} {size} b{batch}: skipped (time budget)", flush=True)
                    on_row()
                    continue
                images_np = rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
                tokens_np = rng.integers(0, tok.codebook_size, size=(batch, size // f, size // f), dtype=np.int32)
                images = torch.from_numpy(images_np).to(device)
                tokens = torch.from_numpy(tokens_np).to(device)
                paths: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
                    "torch-fp32": (partial(tp.encode, images, False), partial(tp.decode, tokens, False)),
                    "torch-bf16": (partial(tp.encode, images, True), partial(tp.decode, tokens, True)),
                }
                if compiled_enc is not None and compiled_dec is not None:
                    paths["torch-compile"] = (partial(compiled_enc, images), partial(compiled_dec, tokens))
                for name, (enc_s, dec_s) in sessions.items():
                    paths[name] = (
                        ort_device_runner(enc_s, "images", images_np, device),
                        ort_device_runner(dec_s, "tokens", tokens_np, device),
                    )
                if device == "cuda":
                    from models.runtime.onnx import ModelRuntime

                    rt = ModelRuntime.load(d, device="cuda", precision="fp16")
                    paths["ort-fp16-host"] = (partial(rt.encode, images_np), partial(rt.decode, tokens_np))
                for name, (enc_fn, dec_fn) in paths.items():
                    if device == "cuda" and name.startswith("ort"):
                        torch.cuda.empty_cache()  # torch's cached blocks would leave ORT's arena short of memory
                    for direction, fn, flops in (("encode", enc_fn, enc_flops), ("decode", dec_fn, dec_flops)):
                        row: dict[str, Any] = {"preset": preset, "size": size, "batch": batch, "path": name, "direction": direction}
                        try:
                            sec = time_fn(fn, device, min_seconds)
                        except Exception as exc:  # OOM or a backend refusing a shape: record, go on
                            print(
                                f"  {preset} {size} b{batch} {name} {direction}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True
                            )
                            rows.append(row | {"error": str(exc)[:500]})
                            if device == "cuda":
                                torch.cuda.empty_cache()
                            on_row()
                            continue
                        tflops = flops * batch / sec / 1e12
                        pct = 100 * tflops / peak if peak == peak else None
                        rows.append(
                            row
                            | {
                                "seconds": sec,
                                "images_per_s": batch / sec,
                                "gflop_per_image": flops / 1e9,
                                "tflops": tflops,
                                "pct_of_peak": pct,
                            }
                        )
                        print(
                            f"  {preset:14s} {size:4d} b{batch:<3d} {name:14s} {direction}: {batch / sec:9.1f} img/s  {tflops:7.2f} TFLOP/s",
                            flush=True,
                        )
                        on_row()


def add_ratios(rows: list[dict[str, Any]]) -> None:
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if "images_per_s" in r:
            groups.setdefault((r["preset"], r["size"], r["batch"], r["direction"]), {})[r["path"]] = r
    for group in groups.values():
        eager = group.get("torch-fp32")
        torch_best = max((r["images_per_s"] for p, r in group.items() if p.startswith("torch")), default=None)
        for r in group.values():
            r["vs_torch_eager"] = r["images_per_s"] / eager["images_per_s"] if eager else None
            r["vs_best_torch"] = r["images_per_s"] / torch_best if torch_best else None


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'preset':14s} {'size':>4s} {'batch':>5s} {'dir':6s} {'path':14s} {'img/s':>9s} {'TFLOP/s':>8s} {'%peak':>6s} {'x eager':>7s} {'x best':>6s}"
    )
    for r in rows:
        if "skipped" in r:
            print(f"{r['preset']:14s} {r['size']:4d} {r['batch']:5d} skipped ({r['skipped']})")
            continue
        if "images_per_s" not in r:
            print(f"{r['preset']:14s} {r['size']:4d} {r['batch']:5d} {r['direction']:6s} {r['path']:14s} FAILED")
            continue
        pct = f"{r['pct_of_peak']:6.1f}" if r.get("pct_of_peak") is not None else "     -"
        print(
            f"{r['preset']:14s} {r['size']:4d} {r['batch']:5d} {r['direction']:6s} {r['path']:14s} {r['images_per_s']:9.1f} "
            f"{r['tflops']:8.2f} {pct} {r['vs_torch_eager']:7.2f} {r['vs_best_torch']:6.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--presets", nargs="+", default=["f8-simvq-16k", "f16-simvq-64k"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--min-seconds", type=float, default=1.0, help="time each measurement at least this long")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--quick", action="store_true", help="CPU-sized sweep: 128 px, batches 1 and 4, no torch.compile")
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds; shapes not started by then are skipped (0 = no limit)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    start = time.monotonic()
    deadline = start + args.time_budget if args.time_budget > 0 else float("inf")
    if args.quick:
        args.sizes, args.batches, args.no_compile, args.min_seconds = [128], [1, 4], True, 0.5
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    peak = matmul_peak_tflops(args.device)
    import onnxruntime as ort

    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "revision": git_revision(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "bf16_matmul_peak_tflops": peak,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    print(json.dumps(meta), flush=True)
    rows: list[dict[str, Any]] = []

    def write() -> None:
        add_ratios(rows)
        meta["wall_s"] = round(time.monotonic() - start, 1)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    for preset in args.presets:
        bench_model(preset, args.device, args.sizes, args.batches, args.min_seconds, peak, not args.no_compile, rows, write, deadline)
    write()
    print_table(rows)


if __name__ == "__main__":
    main()
