"""How long does `vqtok import` take for a full-size published VQModel, and does it pass its gates?

Each family is diffusers' VQModel built from the published config.json (the architecture at full size;
the weights are random and seeded: no download), saved with `save_pretrained` into a temporary folder as
users get it, then imported with `import_vqmodel` (256² parity photos from Kodak): the phases' seconds
(load, check against diffusers, write, ONNX export with its parity gate), the ids' agreement with
diffusers and the export's fp32 agreement with torch. Prints a table, writes JSON.

    python -m bench.import_time --families movq-f8,amused-f16 --out bench/results/imported_gpu/cpu-DATE/import_time.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness.record import DATA, host_fields, table, write_json

D, AD, U, AU = "DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"
# the published config.json of each family (the fields VQModel reads), as on the hub
FAMILIES: dict[str, dict[str, Any]] = {
    "movq-f8": {  # kandinsky-community/kandinsky-2-2-decoder, subfolder movq
        "act_fn": "silu",
        "block_out_channels": [128, 256, 256, 512],
        "down_block_types": [D, D, D, AD],
        "up_block_types": [AU, U, U, U],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "norm_type": "spatial",
        "num_vq_embeddings": 16384,
        "vq_embed_dim": 4,
    },
    "amused-f16": {  # amused/amused-256, subfolder vqvae
        "act_fn": "silu",
        "block_out_channels": [128, 256, 256, 512, 768],
        "down_block_types": [D] * 5,
        "up_block_types": [U] * 5,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 64,
        "layers_per_block": 2,
        "mid_block_add_attention": False,
        "norm_num_groups": 32,
        "norm_type": "group",
        "num_vq_embeddings": 8192,
        "force_upcast": True,
    },
    "ldm-vq-f4": {  # CompVis/ldm-celebahq-256, subfolder vqvae (latent-diffusion's VQ-f4)
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512],
        "down_block_types": [D, D, D],
        "up_block_types": [U, U, U],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 3,
        "layers_per_block": 2,
        "num_vq_embeddings": 8192,
    },
}


def vqmodel(config: dict[str, Any], seed: int) -> Any:
    """diffusers' VQModel of a published config.json's fields, random weights (seeded); `force_upcast`, which
    the constructor does not take, goes into its config as the hub's file has it."""
    import torch
    from diffusers import VQModel

    torch.manual_seed(seed)
    config = dict(config)
    force_upcast = config.pop("force_upcast", None)
    vq: Any = VQModel(**config)  # diffusers ships no type information mypy can follow here
    if force_upcast is not None:
        vq.register_to_config(force_upcast=force_upcast)
    return vq


def build(family: str, folder: Path, seed: int) -> Path:
    """diffusers' VQModel of this family, random weights (seeded), saved as a download would be."""
    out = folder / family
    vqmodel(FAMILIES[family], seed).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch
    from safetensors.torch import load_file

    from models.importers.diffusers import import_vqmodel

    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"question": "time to import full-size VQModels (random weights) and their gates", **host_fields(), "rows": []}
    rows = []
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            source = build(family, Path(tmp), seed=0)
            built = time.perf_counter() - t0
            params = sum(t.numel() for t in load_file(str(source / "diffusion_pytorch_model.safetensors")).values())
            imported = import_vqmodel(
                str(source), name=family, output=Path(tmp) / "out", resolution=args.resolution, parity_images=DATA / "kodak"
            )
            fp32 = imported.manifest["parity"]["fp32"]["figures"]
            record = {
                "family": family,
                "parameters": params,
                "downsample": imported.config.downsample,
                "codebook_size": imported.config.codebook_size,
                "code_dim": imported.config.latent_dim,
                "build_s": built,
                "seconds": imported.seconds,
                "diffusers_token_agreement": imported.parity["token_agreement"],
                "diffusers_near_ties": imported.parity["near_ties"],
                "diffusers_decode_psnr_db": imported.parity["decode_psnr_db"],
                "onnx_fp32_token_agreement": min(f["token_agreement"] for f in fp32.values()),
                "precisions": imported.manifest["precisions"],
            }
            result["rows"].append(record)
            write_json(args.out, result)
            s = imported.seconds
            rows.append(
                [
                    family,
                    f"{params / 1e6:.1f} M",
                    f"f{record['downsample']}, K={record['codebook_size']:,}, D={record['code_dim']}",
                    f"{s['load']:.0f}",
                    f"{s['check']:.0f}",
                    f"{s['export']:.0f}",
                    f"{s['total']:.0f}",
                    f"{100 * record['diffusers_token_agreement']:.2f} % ({record['diffusers_near_ties']} ties)",
                    f"{record['diffusers_decode_psnr_db']:.1f}",
                    f"{100 * record['onnx_fp32_token_agreement']:.2f} %",
                    "+".join(record["precisions"]),
                ]
            )
            print(rows[-1], flush=True)
    headers = [
        "family",
        "parameters",
        "grid",
        "load s",
        "check s",
        "export s",
        "total s",
        "ids = diffusers",
        "decode dB",
        "ONNX fp32 ids",
        "graphs",
    ]
    print(table(headers, rows, right=[False, True, False, True, True, True, True, True, True, True, False]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
