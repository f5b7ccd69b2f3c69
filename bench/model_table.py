"""The shipped models side by side: one table, the same metrics, from their committed evaluation reports.

Reads, for each model, `vqtok eval`'s report on photos256/val (`bench/results/model_quality/NAME_photos256val.json`)
and `bench.codebook_usage`'s count over photos256/val and photos-extra (`…/usage_NAME.json`), and prints the
markdown table the README and the model cards show, codec rows at each model's rate included; `--out` writes
the same rows as JSON. Nothing is measured here: run the two commands below per model first.

    vqtok eval --model NAME --data ../shared/data/photos256/val --compare-codecs --out bench/results/model_quality/NAME_photos256val.json
    python -m bench.codebook_usage --model NAME --out bench/results/model_quality/usage_NAME.json
    python -m bench.model_table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.harness.record import RESULTS, host_fields, table, write_json

MODELS = ["photo-f8-simvq-16k-v2", "photo-f8-simvq-16k", "photo-f16-simvq-16k", "photo-f16-fsq-64k"]
QUALITY = RESULTS / "model_quality"


def _f(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _quality_cells(row: dict[str, Any]) -> list[str]:
    """bpp, PSNR, SSIM, MS-SSIM, LPIPS-Alex, rFID and KID×10³ of one eval-report row (a tokenizer or a codec)."""
    kid = row.get("kid")
    return [
        f"{row['bpp']:.3f}",
        f"{row['psnr']:.2f}",
        f"{row['ssim']:.3f}",
        _f(row.get("ms_ssim"), ".3f"),
        _f(row.get("lpips_alex"), ".3f"),
        _f(row.get("rfid"), ".1f"),
        "–" if kid is None else f"{1000 * kid:.1f}",
    ]


def rows_for(name: str, folder: Path) -> tuple[dict[str, Any], list[list[str]]]:
    report = json.loads((folder / f"{name}_photos256val.json").read_text())
    usage_path = folder / f"usage_{name}.json"
    usage = json.loads(usage_path.read_text()) if usage_path.exists() else None
    tok = report["tokenizer"]
    grid = 256 // report["downsample"]
    record = {
        "model": name,
        "tokens_256": grid * grid,
        "codebook_size": report["codebook_size"],
        **{k: tok.get(k) for k in ("bpp", "psnr", "ssim", "ms_ssim", "lpips_alex", "rfid", "kid", "usage", "perplexity")},
        "usage_val_extra": None if usage is None else usage["usage"],
        "tokens_counted": None if usage is None else usage["tokens"],
    }
    rows = [
        [
            f"**{name}**",
            f"{grid * grid:,}",
            f"{report['codebook_size']:,}",
            *_quality_cells(tok),
            f"{100 * tok['usage']:.1f} %",
            "–" if usage is None else f"{100 * usage['usage']:.1f} % of {usage['tokens'] / 1e6:.2f} M",
            f"{tok['perplexity']:,.0f}",
        ]
    ]
    for codec in ("webp", "jpeg"):
        row = report.get(codec)
        if not row:
            continue
        over = row.get("bpp_over_tokenizer")
        label = f"{'WebP' if codec == 'webp' else 'JPEG'} at {name}'s rate" + (f" ({over:.2f}× its bits)" if over and over > 1.005 else "")
        rows.append([label, "", "", *_quality_cells(row), "", "", ""])
        record[codec] = {
            k: row.get(k) for k in ("bpp", "psnr", "ssim", "ms_ssim", "lpips_alex", "rfid", "kid", "images_over_rate", "bpp_over_tokenizer")
        }
    return record, rows


HEADERS = [
    "model (photos256/val, 200 photos, 256²)",
    "tokens",
    "K",
    "bpp",
    "PSNR dB",
    "SSIM",
    "MS-SSIM",
    "LPIPS-Alex ↓",
    "rFID ↓ (200)",
    "KID×10³ ↓",
    "usage (val)",
    "usage (val + photos-extra)",
    "perplexity (val)",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--folder", type=Path, default=QUALITY)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    records, rows = [], []
    for name in args.models.split(","):
        record, model_rows = rows_for(name, args.folder)
        records.append(record)
        rows += model_rows
    print(table(HEADERS, rows, right=[False, *[True] * (len(HEADERS) - 1)]))
    write_json(args.out, {"question": "the shipped models on one table", **host_fields(), "models": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
