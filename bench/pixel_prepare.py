"""What does the pixel rule cost per image?

`models.core.pixels.prepare` (bytes -> model input) for each resize
mode, against simplejpeg's bare decode, on a folder of JPEGs, in this process (one thread). Prints a
table (µs per image, best of `--repeats` passes), writes JSON.

    python -m bench.pixel_prepare --images ../shared/data/photos256/val --resolution 256 --out pixel_prepare.json

Committed runs: bench/results/pixel_prepare/
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness.load import read_jpegs
from bench.harness.record import PHOTOS_VAL, git_revision
from models.core import pixels


def best_us(fn: Callable[[bytes], Any], datas: list[bytes], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for d in datas:
            fn(d)
        best = min(best, (time.perf_counter() - t) / len(datas) * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=Path, default=PHOTOS_VAL)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--downsample", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    datas = read_jpegs(args.images)
    rows: dict[str, float] = {}
    if pixels._simplejpeg is not None:
        rows["simplejpeg decode"] = best_us(lambda d: pixels._simplejpeg.decode_jpeg(d, colorspace="RGB"), datas, args.repeats)
    for mode in pixels.RESIZE_MODES:
        rows[f"prepare {mode}"] = best_us(
            lambda d, mode=mode: pixels.prepare(d, downsample=args.downsample, resolution=args.resolution, resize=mode),
            datas,
            args.repeats,
        )
    for name, us in rows.items():
        print(f"{name:20s} {us:8.1f} µs/image")
    if args.out:
        result = {
            "images": len(datas),
            "folder": str(args.images),
            "resolution": args.resolution,
            "us_per_image": rows,
            "host": platform.node(),
            "python": platform.python_version(),
            "revision": git_revision(),
            "date": time.strftime("%Y-%m-%d"),
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
