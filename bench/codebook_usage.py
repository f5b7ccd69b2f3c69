"""How much of a codebook does a model use, counted over enough tokens to mean it?

200 images of 256 tokens cannot show 95 % of 16,384 codes (51,200 tokens: each code 3 times on average, and
a few codes never). This counts codes over several image folders at once (by default photos256/val and every
photos-extra folder: ≈ 6,200 photos, 1.6 M tokens at f = 16), through the model's ONNX encoder (fp32, the
CPU), each photo resized as the service's crop mode does, and reports usage (codes seen ÷ K), perplexity
(exp of the code distribution's entropy) and the share of tokens the most frequent 1 % of codes take.

    python -m bench.codebook_usage --model photo-f16-simvq-16k --out bench/results/model_quality/usage_f16_vq.json
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness.record import DATA, host_fields, write_json
from models.core import pixels
from models.core.artefacts import resolve_model_dir
from models.runtime.onnx import ModelRuntime

DEFAULT_FOLDERS = [DATA / "photos256" / "val", *sorted((DATA / "photos-extra").glob("*/"))]


def count_codes(runtime: ModelRuntime, folders: list[Path], batch_size: int) -> tuple[np.ndarray, int, float]:
    """Code counts over every image of `folders` (crop to the model's resolution), images, seconds."""
    info = runtime.info
    counts = np.zeros(info.codebook_size, dtype=np.int64)
    files = [f for folder in folders for f in sorted(folder.iterdir()) if f.suffix.lower() in pixels.IMAGE_EXTENSIONS]
    t0 = time.perf_counter()
    for start in range(0, len(files), batch_size):
        batch = [
            pixels.prepare(f.read_bytes(), downsample=info.downsample, resolution=info.resolution, resize="crop").pixels
            for f in files[start : start + batch_size]
        ]
        tokens = runtime.encode(np.stack(batch))
        counts += np.bincount(tokens.ravel(), minlength=info.codebook_size)
    return counts, len(files), time.perf_counter() - t0


def usage_figures(counts: np.ndarray) -> dict[str, Any]:
    total = int(counts.sum())
    p = counts[counts > 0] / total
    top = np.sort(counts)[::-1][: max(1, len(counts) // 100)]
    return {
        "tokens": total,
        "codes": len(counts),
        "codes_used": int((counts > 0).sum()),
        "usage": float((counts > 0).mean()),
        "perplexity": float(math.exp(-(p * np.log(p)).sum())),
        "tokens_per_code": total / len(counts),
        "top_1pct_share": float(top.sum() / total),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model directory or shipped name")
    ap.add_argument("--folders", type=Path, nargs="+", default=DEFAULT_FOLDERS)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    runtime = ModelRuntime.load(resolve_model_dir(args.model), device="cpu", precision="fp32")
    counts, images, seconds = count_codes(runtime, args.folders, args.batch_size)
    figures = usage_figures(counts)
    result = {
        "question": "codebook usage over enough tokens (issue 30)",
        **host_fields(None),
        "model": runtime.info.name,
        "folders": [str(f) for f in args.folders],
        "images": images,
        "seconds": seconds,
        **figures,
    }
    print(
        f"{runtime.info.name}: {images} images, {figures['tokens']:,} tokens over {figures['codes']:,} codes "
        f"({figures['tokens_per_code']:.0f} a code): usage {figures['usage'] * 100:.2f} %, perplexity {figures['perplexity']:,.0f}, "
        f"the top 1 % of codes take {figures['top_1pct_share'] * 100:.1f} % of tokens ({seconds:.0f} s)"
    )
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
