"""Why did `vqtok codebook retrain --init kmeans` leave 73 % of v2's 4,096 new codes dead? Measured on
encoder latents: k-means centroids from photos256/train latents, usage and latent MSE on held-out
photos256/val latents, for the old SimVQ init (least-squares W over a random C) and the new one
(C = centroids, W = I), at several numbers of training latents.

    nice -n 10 .venv/bin/python -m bench.codebook_init --out bench/results/codebook_retrain/cpu-2026-12-07/diagnose.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from models.tokenizer import Tokenizer
from training.codebook import Augment, _chunks, _images, _open, _Subset, assign, encode_images, kmeans

p = argparse.ArgumentParser()
p.add_argument("--model", default="models/pretrained/photo-f8-simvq-16k-v2")
p.add_argument("--train", default="/work/shared/data/photos256/train")
p.add_argument("--val", default="/work/shared/data/photos256/val")
p.add_argument("--k", type=int, default=4096)
p.add_argument("--train-images", type=int, default=128)
p.add_argument("--val-images", type=int, default=64)
p.add_argument("--latents", default="16384,65536,131072")
p.add_argument("--iters", type=int, default=10)
p.add_argument("--out", required=True)
a = p.parse_args()
torch.set_num_threads(2)
torch.manual_seed(0)
model = Tokenizer.from_pretrained(a.model).eval()
q = model.quantizer
t0 = time.perf_counter()
crop = Augment(256, "center_crop", flip=False)
train_src, val_src = _open(a.train), _open(a.val)
order = torch.randperm(len(train_src), generator=torch.Generator().manual_seed(0)).tolist()
train = encode_images(model, _chunks(_images(_Subset(train_src, order[: a.train_images]), crop, 0, 1), 8), 1 << 62, False)
val = encode_images(model, _chunks(_images(_Subset(val_src, range(a.val_images)), crop, 0, 1), 8), 1 << 62, False)
tr, va = train.flat(False), val.flat(False)
encode_s = time.perf_counter() - t0


def on_val(codebook: torch.Tensor) -> dict[str, float]:
    idx, d2 = assign(va, codebook)
    return {"usage": len(idx.unique()) / len(codebook), "latent_mse": float(d2.mean()), "code_norm": float(codebook.norm(dim=1).mean())}


report: dict[str, object] = {
    "model": a.model,
    "k": a.k,
    "train_latents_available": len(tr),
    "val_latents": len(va),
    "encode_s": round(encode_s, 1),
    "v2_16k_codebook_on_val": on_val(q.codebook().detach()),
    "val_latent_norm": float(va.norm(dim=1).mean()),
    "runs": [],
}
g = torch.Generator().manual_seed(0)
for n in [int(v) for v in a.latents.split(",")]:
    x = tr[torch.randperm(len(tr), generator=g)[:n]]
    t = time.perf_counter()
    stats: dict[str, object] = {}
    centers = kmeans(x, a.k, a.iters, g, stats=stats)
    kmeans_s = time.perf_counter() - t
    basis = torch.randn(a.k, x.shape[1], generator=g) * x.shape[1] ** -0.5  # a fresh SimVQ C (what a new K draws)
    w_t = torch.linalg.lstsq(basis.double(), centers.double()).solution  # the old init: min ‖C·Wᵀ − M‖²
    old = (basis.double() @ w_t).float()
    residual = float((old.double() - centers.double()).pow(2).sum() / centers.double().pow(2).sum())
    report["runs"].append(  # type: ignore[union-attr]
        {
            "train_latents": n,
            "latents_per_code": n / a.k,
            "kmeans_s": round(kmeans_s, 1),
            "kmeans_final_train_mse": stats["final_mse"],
            "kmeans_empty_after_lloyd": stats["final_empty"],
            "new_init_C_is_centroids": on_val(centers),
            "old_init_lstsq_W": {**on_val(old), "relative_residual": residual},
        }
    )
    print(json.dumps(report["runs"][-1]), flush=True)  # type: ignore[index]
with open(a.out, "w") as f:
    json.dump(report, f, indent=2)
print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
