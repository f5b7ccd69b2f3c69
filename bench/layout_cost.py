"""What LLM sequence layouts cost next to encoding: a 64-image batch of 32×32 and 16×16 token grids
(256² and 128² photos through the shipped model, f8), per layout preset:

- build: `Layout.to_sequences` of the batch, (64, h, w) -> (64, L);
- parse one output: `find_spans` on one LLM output holding the 64 spans with text between them;
- parse batch: `grids_from_sequences` of the (64, L) array back to (64, h, w);

against the CPU encode of the same 64 images with ONNX Runtime (`models.runtime.onnx.ModelRuntime`).
Best of `--repeats` passes each, in this process. Prints a table, writes JSON.

    python bench/layout_cost.py --out bench/results/layout_cost/layout_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness.load import read_jpegs
from bench.harness.record import REPO as ROOT
from bench.harness.record import git_revision
from models.core import pixels
from models.core.artefacts import DEFAULT_MODEL, pretrained_repo
from models.core.layouts import LAYOUTS, Layout
from models.runtime.onnx import ModelRuntime

TEXT_VOCAB = 32000  # a Llama-sized text vocabulary: the image ids start here


def best_ms(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def char_ids(text: str) -> list[int]:
    """emu3's size text as ids: one per character (the real tokenizer's ids are looked up once per grid size and cached)."""
    return [ord(c) for c in text]


def photos(folder: Path, n: int, size: int) -> np.ndarray:
    """n real photos, centre-cropped to size×size, uint8 (n, size, size, 3)."""
    datas = read_jpegs(folder)
    datas = (datas * (n // len(datas) + 1))[:n]
    return np.stack([pixels.prepare(d, downsample=8, resolution=size, resize="crop").pixels for d in datas])


def one_output(sequences: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The batch's spans in one LLM output, 1 to 20 text ids before each."""
    parts: list[np.ndarray] = []
    for row in sequences:
        parts += [rng.integers(0, TEXT_VOCAB, size=int(rng.integers(1, 21))), row]
    return np.concatenate(parts)


def time_layout(layout: Layout, grids: np.ndarray, output: np.ndarray, grid: tuple[int, int] | None, repeats: int) -> dict[str, float]:
    sequences = layout.to_sequences(grids)
    hw = (int(grids.shape[1]), int(grids.shape[2]))
    return {
        "build_ms": best_ms(lambda: layout.to_sequences(grids), repeats),
        "parse_output_ms": best_ms(lambda: layout.find_spans(output, grid=grid), repeats),
        "parse_batch_ms": best_ms(lambda: layout.grids_from_sequences(sequences, hw), repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(pretrained_repo() / DEFAULT_MODEL))
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "photos256" / "val")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20, help="passes for the layout timings (the encode gets a quarter of them, at least 2)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    runtime = ModelRuntime.load(args.model, device="cpu")
    k, f = runtime.info.codebook_size, runtime.info.downsample
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for size in (256, 128):
        images = photos(args.images, args.batch, size)
        grids = runtime.encode(images)
        encode_ms = best_ms(lambda images=images: runtime.encode(images), max(2, args.repeats // 4))
        h, w = size // f, size // f
        for name in LAYOUTS:
            layout = Layout(name, vocab_offset=TEXT_VOCAB, codebook_size=k, max_grid=128, text_ids=char_ids if name == "emu3" else None)
            sequences = layout.to_sequences(grids)
            output = one_output(sequences, rng)
            grid = (h, w) if name in ("plain", "chameleon") else None
            spans = layout.find_spans(output, grid=grid)
            assert len(spans) == args.batch and all((s.grid == g).all() for s, g in zip(spans, grids, strict=True))
            assert (layout.grids_from_sequences(sequences, (h, w)) == grids).all()
            row = {"layout": name, "grid": [h, w], "sequence_length": int(sequences.shape[1])}
            row.update(time_layout(layout, grids, output, grid, args.repeats))
            row["encode_ms"] = encode_ms
            row["share_of_encode"] = (row["build_ms"] + row["parse_output_ms"]) / encode_ms
            rows.append(row)
    print(f"{args.batch} images, CPU encode through ONNX Runtime ({runtime.runtime_name}); best of {args.repeats} passes")
    print(
        f"{'layout':10s} {'grid':>6s} {'L':>5s} {'build ms':>9s} {'parse output ms':>16s} {'parse batch ms':>15s} {'encode ms':>10s} {'share':>7s}"
    )
    for r in rows:
        print(
            f"{r['layout']:10s} {r['grid'][0]:>3d}x{r['grid'][1]:<2d} {r['sequence_length']:5d} {r['build_ms']:9.3f} "
            f"{r['parse_output_ms']:16.3f} {r['parse_batch_ms']:15.3f} {r['encode_ms']:10.1f} {r['share_of_encode']:7.2%}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "batch": args.batch,
            "model": args.model,
            "runtime": runtime.runtime_name,
            "rows": rows,
            "share_of_encode": "(build + parse output) / encode",
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],  # the machine is shared: other jobs slow both sides of the ratio
            "python": platform.python_version(),
            "numpy": np.__version__,
            "revision": git_revision(),
            "date": time.strftime("%Y-%m-%d"),
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
