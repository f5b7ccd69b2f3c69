"""How do the tokenizers compare with JPEG and WebP: PSNR and LPIPS-Alex against bits per pixel?

On Kodak (all 24, full resolution) and photos256/val (first 200), JPEG and WebP (Pillow) are swept over
quality to trace curves; each `--model DIR` is one point at its fixed rate, evaluated with `vqtok eval`'s
own function (training.evaluate.evaluate, with the codecs at equal rate and, where there are enough
images, rFID/KID for every row). Every metric, the codec encoder and the codec-at-rate rule come from
training/evaluate.py; nothing is reimplemented here.

  .venv/bin/python -m bench.rate_distortion --model models/pretrained/photo-f8-simvq-16k [--model DIR ...]
  # a model added to an earlier run: its codec sweeps and known models' rows reused, eval reports taken as is
  .venv/bin/python -m bench.rate_distortion --model models/pretrained/photo-f8-simvq-16k-v2 \
      --model models/pretrained/photo-f8-simvq-16k --reuse bench/results/rate_distortion/rate_distortion.json \
      --report photos256/val=bench/results/training/gpu-h200-2026-11-27-v2/val.json

Writes bench/results/rate_distortion/rate_distortion.json, docs/figures/rate_distortion.png (PSNR and LPIPS vs bpp per
set) and docs/figures/crops.png (128² crops of a few Kodak images: original, each tokenizer, JPEG and
WebP at that tokenizer's rate, each labelled with the whole image's bpp / PSNR / LPIPS-Alex), and
prints a table.

Committed runs: bench/results/rate_distortion/
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.harness.record import REPO, RESULTS
from models.core.artefacts import resolve_model_dir
from models.tokenizer import Tokenizer
from training.data import decode_image, iter_images
from training.evaluate import (
    EvalOptions,
    ImageScores,
    encode_at_quality,
    encode_at_rate,
    evaluate,
    load_lpips_alex,
    reconstruct,
    token_bpp,
)

SHARED = REPO.parent / "shared" / "data"
# Spaced so the curves span ~0.1–1.2 bpp on Kodak with a point near the tokenizers' ~0.2 bpp.
JPEG_QUALITIES = [3, 6, 10, 20, 40, 75]
WEBP_QUALITIES = [0, 5, 15, 30, 50, 75]
CROP = 128
# (image, top, left) of each crop: detail where tokenizers and codecs differ (text, edges, texture).
CROPS = [("kodim05.png", 190, 300), ("kodim14.png", 250, 330), ("kodim23.png", 110, 420)]
CODECS = (("JPEG", "jpeg"), ("WEBP", "webp"))


def model_label(model_dir: Path) -> str:
    """The model's name: its directory name (which carries the data prefix, e.g. photo-f8-simvq-16k),
    with the config's preset when the directory name does not contain it."""
    preset = json.loads((model_dir / "config.json").read_text()).get("preset", "")
    return model_dir.name if not preset or preset in model_dir.name else f"{model_dir.name} ({preset})"


def load_images(path: Path, limit: int) -> list[np.ndarray]:
    return [img for _, img in iter_images(path, limit) if img is not None]


def to_batch(images: list[np.ndarray]) -> torch.Tensor:
    """Same-shape uint8 HWC images -> uint8 (B, 3, H, W)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def batches(images: list[np.ndarray], size: int) -> list[list[np.ndarray]]:
    """Consecutive same-shape images in groups of at most `size` (LPIPS runs on a batch at once)."""
    groups: list[list[np.ndarray]] = []
    for img in images:
        if groups and len(groups[-1]) < size and groups[-1][0].shape == img.shape:
            groups[-1].append(img)
        else:
            groups.append([img])
    return groups


def sweep(images: list[np.ndarray], fmt: str, qualities: list[int], lpips: Any, batch_size: int) -> list[dict[str, Any]]:
    """One point per quality: every image encoded at that quality; mean bpp, PSNR and LPIPS-Alex over the
    images (SSIM/MS-SSIM only at the equal-rate points, where evaluate() computes them: at full
    resolution on a CPU they would triple the sweep's time)."""
    points = []
    for q in qualities:
        scores = ImageScores(lpips, structural=False)
        for group in batches(images, batch_size):
            coded = [encode_at_quality(img, fmt, q) for img in group]
            scores.add(to_batch(group), to_batch([d for d, _ in coded]), [b for _, b in coded])
        points.append({"quality": q, **scores.summary()})
    return points


def run_dataset(
    name: str, path: Path, limit: int, models: dict[str, Tokenizer], args: argparse.Namespace, lpips: Any, log: Callable[[str], None]
) -> dict[str, Any]:
    images = load_images(path, limit)
    out: dict[str, Any] = {"path": str(path), "images": len(images), "sweeps": {}, "models": {}}
    prior = args.reused.get("datasets", {}).get(name, {}) if args.reused else {}
    same_set = prior.get("images") == len(images) and prior.get("path") == str(path)
    for fmt, key in CODECS:
        qualities = args.jpeg_qualities if key == "jpeg" else args.webp_qualities
        if same_set and args.reused["meta"].get(f"{key}_qualities") == qualities:
            out["sweeps"][key] = prior["sweeps"][key]
            log(f"{name}: {key} sweep from {args.reuse}")
            continue
        t0 = time.perf_counter()
        out["sweeps"][key] = sweep(images, fmt, qualities, lpips, args.batch_size)
        log(f"{name}: {key} sweep, {len(out['sweeps'][key])} qualities × {len(images)} images in {time.perf_counter() - t0:.0f} s")
    for label, model in models.items():
        if (name, label) in args.reports:
            out["models"][label] = args.reports[name, label]
            log(f"{name}: {label} from its `vqtok eval` report")
            continue
        if same_set and label in prior.get("models", {}):
            out["models"][label] = prior["models"][label]
            log(f"{name}: {label} from {args.reuse}")
            continue
        t0 = time.perf_counter()
        opts = EvalOptions(limit=limit, batch_size=args.batch_size, device="cpu", compare_codecs=True, fid=not args.no_fid)
        out["models"][label] = evaluate(model, path, opts, progress=False)
        log(f"{name}: {label} with JPEG/WebP at equal rate in {time.perf_counter() - t0:.0f} s")
    return out


def crop_tile(img: np.ndarray, test: np.ndarray, box: tuple[int, int], title: str, bpp: float, lpips: Any) -> tuple[np.ndarray, str]:
    """(128² crop of `test` at `box` = (top, left), label with the whole image's bpp / PSNR / LPIPS-Alex)."""
    s = ImageScores(lpips, structural=False)
    s.add(to_batch([img]), to_batch([test]), [bpp])
    m = s.summary()
    lp = "" if m["lpips_alex"] is None else f" / {m['lpips_alex']:.3f}"
    top, left = box
    return test[top : top + CROP, left : left + CROP], f"{title}\n{bpp:.3f} bpp / {m['psnr']:.2f} dB{lp}"


def crops(models: dict[str, Tokenizer], kodak: Path, lpips: Any) -> list[list[tuple[np.ndarray, str]]]:
    """Rows of (128² crop, label): original, then per model the tokenizer, JPEG and WebP at its rate."""
    rows = []
    for fname, top, left in CROPS:
        img = decode_image((kodak / fname).read_bytes())
        h, w = img.shape[:2]
        row = [(img[top : top + CROP, left : left + CROP], f"original\n{fname}")]
        rates = []
        for label, model in models.items():
            rec, _ = reconstruct(model, to_batch([img]))
            bpp = token_bpp(h, w, model.downsample, model.codebook_size)
            row.append(crop_tile(img, rec[0].permute(1, 2, 0).numpy(), (top, left), label, bpp, lpips))
            rates.append((label, bpp))
        for label, bpp in dict((b, (lab, b)) for lab, b in rates).values():  # each rate once (models of one rate share it)
            for fmt, name in (("JPEG", "JPEG"), ("WEBP", "WebP")):
                decoded, actual, _ = encode_at_rate(img, fmt, bpp)
                title = f"{name} at {label}'s rate" if len({b for _, b in rates}) > 1 else f"{name} at equal rate"
                row.append(crop_tile(img, decoded, (top, left), title, actual, lpips))
        rows.append(row)
    return rows


def plot_curves(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results["datasets"].items())
    fig, axes = plt.subplots(len(sets), 2, figsize=(11, 4.2 * len(sets)), squeeze=False)
    markers = ["*", "D", "P", "X", "s", "^"]
    for r, (dname, d) in enumerate(sets):
        for c, (metric, ylabel) in enumerate((("psnr", "PSNR (dB) ↑"), ("lpips_alex", "LPIPS-Alex ↓"))):
            ax = axes[r][c]
            for key, color, label in (("jpeg", "tab:orange", "JPEG (Pillow)"), ("webp", "tab:blue", "WebP (Pillow)")):
                pts = [p for p in d["sweeps"][key] if p[metric] is not None]
                ax.plot([p["bpp"] for p in pts], [p[metric] for p in pts], "o-", color=color, ms=4, lw=1.5, label=f"{label}, quality sweep")
            for i, (mname, rep) in enumerate(d["models"].items()):
                t = rep["tokenizer"]
                if t[metric] is None:
                    continue
                ax.plot(t["bpp"], t[metric], markers[i % len(markers)], color=f"C{(i + 2) % 10}", ms=13, mec="black", label=mname, zorder=5)
                for key, color in (("jpeg", "tab:orange"), ("webp", "tab:blue")):
                    row = rep[key]
                    ax.plot(row["bpp"], row[metric], "o", mfc="none", mec=color, ms=11, mew=2, zorder=4)
            ax.set_xlabel("bits per pixel")
            ax.set_ylabel(ylabel)
            ax.set_xlim(0, max(1.0, max(p["bpp"] for p in d["sweeps"]["webp"] if p["bpp"] <= 1.2) * 1.05))
            ax.grid(alpha=0.3)
            ax.set_title(f"{dname} ({d['images']} images): {'PSNR' if metric == 'psnr' else 'LPIPS-Alex'} vs rate", fontsize=11)
            if r == 0 and c == 0:
                ax.plot(
                    [],
                    [],
                    "o",
                    mfc="none",
                    mec="gray",
                    ms=11,
                    mew=2,
                    label="JPEG / WebP at the tokenizer's rate (quality chosen per image)",
                )
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07 / len(sets), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_crops(rows: list[list[tuple[np.ndarray, str]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = len(rows[0])
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.3 * n_cols, 2.75 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, (crop, label) in enumerate(row):
            ax = axes[r][c]
            ax.imshow(crop, interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("128² crops at 1:1 (labels: whole-image bpp / PSNR / LPIPS-Alex)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    def cell(v: Any, spec: str) -> str:
        return "–" if v is None else format(v, spec)

    lines = [
        "| set | method | bpp | PSNR dB | SSIM | MS-SSIM | LPIPS-Alex | rFID | KID×10³ |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dname, d in results["datasets"].items():
        for mname, rep in d["models"].items():
            for key, label in (("tokenizer", f"**{mname}**"), ("jpeg", "JPEG at equal rate"), ("webp", "WebP at equal rate")):
                r = rep[key]
                kid = "–" if r.get("kid") is None else f"{r['kid'] * 1e3:.2f}"
                lines.append(
                    f"| {dname} | {label} | {r['bpp']:.3f} | {r['psnr']:.2f} | {r['ssim']:.3f} | {cell(r['ms_ssim'], '.3f')} | "
                    f"{cell(r['lpips_alex'], '.3f')} | {cell(r.get('rfid'), '.1f')} | {kid} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None, log: Callable[[str], None] = functools.partial(print, flush=True)) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", required=True, help="a model directory (repeatable)")
    ap.add_argument("--kodak", type=Path, default=SHARED / "kodak")
    ap.add_argument("--val", type=Path, default=SHARED / "photos256" / "val")
    ap.add_argument("--kodak-limit", type=int, default=24)
    ap.add_argument("--val-limit", type=int, default=200)
    ap.add_argument("--jpeg-qualities", type=int, nargs="+", default=JPEG_QUALITIES)
    ap.add_argument("--webp-qualities", type=int, nargs="+", default=WEBP_QUALITIES)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-fid", action="store_true", help="skip rFID/KID (the Inception features are most of the val time on a CPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--json", type=Path, default=RESULTS / "rate_distortion" / "rate_distortion.json")
    ap.add_argument("--figure", type=Path, default=REPO / "docs" / "figures" / "rate_distortion.png")
    ap.add_argument("--crops", type=Path, default=REPO / "docs" / "figures" / "crops.png")
    ap.add_argument(
        "--reuse",
        type=Path,
        help="an earlier results JSON: its codec sweeps (same images and qualities) and the reports of models of the same name",
    )
    ap.add_argument(
        "--report",
        action="append",
        default=[],
        metavar="SET=JSON",
        help="a `vqtok eval --compare-codecs --out` report of one --model on SET (Kodak or photos256/val), used as is (repeatable)",
    )
    args = ap.parse_args(argv)
    args.reused = json.loads(args.reuse.read_text()) if args.reuse else None
    args.reports = {}
    for item in args.report:
        set_name, sep, report_path = item.partition("=")
        if not sep or set_name not in ("Kodak", "photos256/val"):
            ap.error(f"--report {item!r}: expected Kodak=JSON or photos256/val=JSON")
        report = json.loads(Path(report_path).read_text())
        label = model_label(resolve_model_dir(report["model"]))  # a directory, or a shipped name (`vqtok eval --model NAME`)
        if label not in {model_label(d) for d in args.model} or "webp" not in report:
            ap.error(
                f"--report {item!r}: a `vqtok eval --compare-codecs` report of one of the --model directories (it names {report['model']})"
            )
        args.reports[set_name, label] = report
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = {model_label(d): Tokenizer.from_pretrained(d).eval() for d in args.model}
    lpips, lpips_reason = load_lpips_alex(torch.device("cpu"))
    if lpips_reason:
        log(f"LPIPS-Alex: {lpips_reason}")
    results: dict[str, Any] = {
        "meta": {
            "command": "python -m bench.rate_distortion "
            + " ".join(f"--model {d}" for d in args.model)
            + (f" --reuse {args.reuse}" if args.reuse else "")
            + "".join(f" --report {r}" for r in args.report),
            "models": {label: str(d) for label, d in zip(models, args.model, strict=True)},
            "jpeg_qualities": args.jpeg_qualities,
            "webp_qualities": args.webp_qualities,
            "sweep_rule": "each codec point: every image encoded at that Pillow quality; bpp and metrics are means over the images",
            "lpips": lpips_reason or "LPIPS v0.1 AlexNet, per image at full resolution",
            "torch_threads": torch.get_num_threads(),
        },
        "datasets": {},
    }
    for dname, path, limit in (("Kodak", args.kodak, args.kodak_limit), ("photos256/val", args.val, args.val_limit)):
        results["datasets"][dname] = run_dataset(dname, path, limit, models, args, lpips, log)
    plot_curves(results, args.figure)
    plot_crops(crops(models, args.kodak, lpips), args.crops)
    results["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    log(table(results))
    log(f"wrote {args.json}, {args.figure}, {args.crops} in {results['meta']['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
