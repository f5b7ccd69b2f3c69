"""Imported diffusers VQModels on the GPU: does each GPU runtime pass the parity gate that our own
models pass, at the code dimensions the public families use?

Two steps, because diffusers is not on the GPU machines:

1. `build` (here, CPU): diffusers' VQModel of each family below — the published architecture narrowed
   (fewer channels), the published codebook size, code dimension and norm type — with seeded random
   weights and a codebook drawn from the encoder's own latents on Kodak photos (a random codebook would
   leave every latent on a handful of codes and make agreement trivial; real codebooks are dense where
   the latents are), saved with `save_pretrained` as a download is, then imported with `vqtok import`'s
   function. Records the import's figures against diffusers and the ONNX CPU gates.
2. `measure` (GPU): each imported directory through the runtimes the service loads — ONNX Runtime's
   CUDA EP at each exported precision and the compiled runtime (fp16, fp32, and `auto`, the ladder the
   service runs) — on the model's own parity photos (`parity.npz`: the CPU float32 reference), and each
   runtime's encode rate at batch 32 for scale. A runtime the gate refuses is recorded with its numbers.

    python -m bench.imported_gpu build --out-dir .gpudata/imported --json bench/results/imported_gpu/cpu-DATE/build.json
    python -m bench.imported_gpu measure --models .gpudata/imported --json $OUT/imported_gpu.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness.record import DATA, host_fields, table, write_json

D, U, AD, AU = "DownEncoderBlock2D", "UpDecoderBlock2D", "AttnDownEncoderBlock2D", "AttnUpDecoderBlock2D"
FAMILIES: dict[str, dict[str, Any]] = {
    # Kandinsky 2.2's MoVQ (spatial norm decoder conditioned on the codes): f8, K = 16,384, D = 4
    "movq-f8-d4": {
        "block_out_channels": [32, 32, 64, 64],
        "down_block_types": [D, D, D, AD],
        "up_block_types": [AU, U, U, U],
        "latent_channels": 4,
        "norm_num_groups": 32,
        "norm_type": "spatial",
        "num_vq_embeddings": 16384,
        "vq_embed_dim": 4,
    },
    # latent-diffusion's VQ-f8 (group norm): f8, K = 16,384, D = 4
    "ldm-vq-f8-d4": {
        "block_out_channels": [32, 32, 64, 64],
        "down_block_types": [D, D, D, D],
        "up_block_types": [U, U, U, U],
        "latent_channels": 4,
        "norm_num_groups": 32,
        "num_vq_embeddings": 16384,
    },
    # aMUSEd's VQGAN: f16, K = 8,192, D = 64, no mid-block attention, force_upcast
    "amused-f16-d64": {
        "block_out_channels": [32, 32, 64, 64, 64],
        "down_block_types": [D] * 5,
        "up_block_types": [U] * 5,
        "latent_channels": 64,
        "mid_block_add_attention": False,
        "norm_num_groups": 32,
        "num_vq_embeddings": 8192,
        "force_upcast": True,
    },
    # taming-transformers' f16 VQGAN (ImageNet): K = 1,024, D = 256
    "taming-f16-d256": {
        "block_out_channels": [32, 32, 32, 64, 64],
        "down_block_types": [D] * 5,
        "up_block_types": [U] * 5,
        "latent_channels": 256,
        "norm_num_groups": 32,
        "num_vq_embeddings": 1024,
    },
}


def build_one(family: str, folder: Path, seed: int) -> Path:
    """The family's VQModel, seeded random weights, its codebook drawn from its encoder's latents on
    Kodak (noise of a tenth of their spread added, so that no two codes coincide), saved as a download."""
    import torch

    from bench.import_time import vqmodel
    from models.export.graphs import images_to_input
    from models.export.parity import find_parity_images, real_parity_images

    vq = vqmodel(FAMILIES[family], seed).eval()
    with torch.no_grad():
        x = images_to_input(torch.from_numpy(real_parity_images(find_parity_images(DATA / "kodak"), (256, 256), 24)))
        latents = vq.encode(x).latents  # before quantisation: (N, D, h, w)
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        k = vq.quantize.embedding.weight.shape[0]
        g = torch.Generator().manual_seed(seed)
        pick = torch.randint(0, len(flat), (k,), generator=g)
        codes = flat[pick] + 0.1 * flat.std(0) * torch.randn(k, flat.shape[1], generator=g)
        vq.quantize.embedding.weight.copy_(codes)
    out = folder / family
    vq.save_pretrained(out)
    return out


def build(args: argparse.Namespace) -> int:
    from models.importers.diffusers import import_vqmodel

    result: dict[str, Any] = {
        "question": "imported VQModels for the GPU gate: the import's figures on the CPU",
        **host_fields(),
        "rows": [],
    }
    rows = []
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            source = build_one(family, Path(tmp), seed=0)
            imported = import_vqmodel(str(source), name=family, output=args.out_dir, resolution=256, parity_images=DATA / "kodak")
        onnx = {
            p: min(f["token_agreement"] for f in r["figures"].values())
            for p, r in imported.manifest["parity"].items()
            if p in ("fp32", "fp16")
        }
        record = {
            "family": family,
            "downsample": imported.config.downsample,
            "codebook_size": imported.config.codebook_size,
            "code_dim": imported.config.latent_dim,
            "diffusers": imported.parity,
            "onnx_cpu_token_agreement": onnx,
            "seconds": imported.seconds,
        }
        result["rows"].append(record)
        write_json(args.json, result)
        p = imported.parity
        rows.append(
            [
                family,
                f"f{record['downsample']}, K={record['codebook_size']:,}, D={record['code_dim']}",
                f"{100 * p['token_agreement']:.2f} % ({p['near_ties']} ties)",
                f"{p['decode_psnr_db']:.1f}",
                ", ".join(f"{k} {100 * v:.2f} %" for k, v in onnx.items()),
                f"{imported.seconds['total']:.0f}",
            ]
        )
    print(table(["family", "grid", "ids = diffusers", "decode dB", "ONNX CPU ids", "import s"], rows))
    return 0


def encode_rate(rt: Any, images: np.ndarray, batch: int = 32, repeats: int = 10) -> float:
    """Images a second through `rt.encode` at `batch` (after a warm-up call), median of `repeats`."""
    x = np.concatenate([images] * (batch // len(images) + 1))[:batch]
    rt.encode(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rt.encode(x)
        times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def measure(args: argparse.Namespace) -> int:
    import torch

    from models.core import gate
    from models.core.errors import ModelLoadError
    from models.runtime.choose import load_runtime
    from models.runtime.compiled import CompiledRuntime
    from models.runtime.onnx import ModelRuntime

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result: dict[str, Any] = {
        "question": "imported VQModels: each GPU runtime's parity gate on the model's real photos",
        **host_fields(args.revision),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "bounds": {"min_token_agreement": gate.GPU_PARITY.min_token_agreement, "min_decode_psnr_db": gate.GPU_PARITY.min_decode_psnr_db},
        "models": {},
    }
    rows = []
    for model_dir in sorted(p for p in args.models.iterdir() if (p / "manifest.json").is_file()):
        parity = gate.read_parity_set(model_dir)
        assert parity is not None, model_dir
        record: dict[str, Any] = {}
        result["models"][model_dir.name] = record
        d = model_dir
        candidates: list[tuple[str, Any]] = [
            (f"onnxruntime-cuda-{p}", lambda p=p, d=d: ModelRuntime.load(d, device="cuda", precision=p, max_batch_size=32))
            for p in ("fp32", "fp16")
            if (d / ("encoder.onnx" if p == "fp32" else "encoder.fp16.onnx")).is_file()
        ]
        candidates += [
            ("compiled-auto", lambda d=d: CompiledRuntime.load(d, device="cuda", max_batch_size=32)),
            ("compiled-fp16", lambda d=d: CompiledRuntime.load(d, device="cuda", precision="fp16", max_batch_size=32)),
            ("compiled-fp32", lambda d=d: CompiledRuntime.load(d, device="cuda", precision="fp32", max_batch_size=32)),
            ("served (runtime=auto)", lambda d=d: load_runtime(d, device="cuda", max_batch_size=32)),
        ]
        for label, load in candidates:
            t0 = time.perf_counter()
            try:
                rt = load()
            except ModelLoadError as exc:
                record[label] = {"refused": str(exc), "load_s": time.perf_counter() - t0}
                rows.append([model_dir.name, label, "refused", "", "", str(exc)[-60:]])
                print(rows[-1], flush=True)
                write_json(args.json, result)
                continue
            load_s = time.perf_counter() - t0
            figures = rt.check_parity() or {}
            if label.startswith("compiled"):  # the rate below at batch 32 runs its graph, not the fallback
                rt.warmup([parity.images.shape[1:3]], [32], parts=("encode",))
            rate = encode_rate(rt, parity.images)
            record[label] = {
                **figures,
                "precision": rt.info.precision,
                "runtime": getattr(rt, "runtime_kind", "onnxruntime"),
                "providers": list(rt.providers),
                "load_s": load_s,
                "encode_images_per_s_b32": rate,
            }
            rows.append(
                [
                    model_dir.name,
                    label,
                    f"{rt.info.precision} {record[label]['runtime']}",
                    f"{100 * figures.get('token_agreement', float('nan')):.2f} %",
                    f"{figures.get('decode_psnr_db', float('nan')):.1f}",
                    f"{rate:.0f} img/s, load {load_s:.0f} s",
                ]
            )
            print(rows[-1], flush=True)
            write_json(args.json, result)
            rt.close()
    print(table(["model", "asked", "served as", "ids = CPU fp32", "decode dB", "encode b32 / load"], rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="step", required=True)
    b = sub.add_parser("build")
    b.add_argument("--families", default=",".join(FAMILIES))
    b.add_argument("--out-dir", type=Path, required=True)
    b.add_argument("--json", type=Path, default=None)
    m = sub.add_parser("measure")
    m.add_argument("--models", type=Path, required=True)
    m.add_argument("--json", type=Path, default=None)
    m.add_argument("--revision", default=None, help="the measured commit (the GPU machine's copy has no .git)")
    args = ap.parse_args(argv)
    return build(args) if args.step == "build" else measure(args)


if __name__ == "__main__":
    sys.exit(main())
