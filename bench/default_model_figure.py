"""Side-by-side picture for the README: Kodak crops, original | vqtok (served ONNX path) | JPEG and
WebP at the same bits per pixel (Pillow, highest quality that stays at or under the rate).

  python bench/default_model_figure.py --model models/pretrained/photo-f8-simvq-16k --out docs/kodak_comparison.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.runtime import ModelRuntime
from training.evaluate import encode_at_rate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--images", nargs="+", default=["kodim05.png", "kodim14.png", "kodim23.png"])
    ap.add_argument("--crop", type=int, default=256, help="centre crop side in pixels")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rt = ModelRuntime.load(args.model, device="cpu")
    k = rt.info.codebook_size
    rows = []
    for name in args.images:
        full = np.asarray(Image.open(DATA / name).convert("RGB"))
        ids = rt.encode(full[None])
        rec = rt.decode(ids)[0]
        bpp = np.log2(k) * ids.size / (full.shape[0] * full.shape[1])
        jpeg, jpeg_bpp, _ = encode_at_rate(full, "JPEG", bpp)
        webp, webp_bpp, _ = encode_at_rate(full, "WEBP", bpp)
        h, w = full.shape[:2]
        top, left = (h - args.crop) // 2, (w - args.crop) // 2
        tiles = [(full, "original"), (rec, f"vqtok {bpp:.3f} bpp"), (jpeg, f"JPEG {jpeg_bpp:.3f} bpp"), (webp, f"WebP {webp_bpp:.3f} bpp")]
        row = []
        for img, label in tiles:
            tile = Image.fromarray(np.ascontiguousarray(img[top : top + args.crop, left : left + args.crop]))
            ImageDraw.Draw(tile).text((6, 6), label, fill=(255, 255, 0))
            row.append(np.asarray(tile))
        rows.append(np.concatenate(row, axis=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
