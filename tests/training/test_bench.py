"""bench.quantizers_cifar10 on a sliver of real CIFAR-10, so GPU time is not spent on a broken script."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any


def test_bench_runs_all_variants_on_cpu(cifar_test_parquet: Path, tmp_path: Path) -> None:
    bench: Any = importlib.import_module("bench.quantizers_cifar10")
    argv = ["--data", str(cifar_test_parquet.parent), "--out", str(tmp_path), "--steps", "2", "--batch-size", "8", "--channels", "8"]
    argv += ["--limit", "64", "--test-limit", "64", "--codebook-sizes", "64", "--threads", "2", "--device", "cpu"]
    results = bench.main(argv, log=lambda _: None)
    assert [r["variant"] for r in results] == [*bench.OURS, *bench.PEERS]
    for r in results:
        assert "error" not in r, r
        assert r["steps"] == 2 and 0 < r["test_usage"] <= 1 and r["test_psnr"] > 5
    fsq = next(r for r in results if r["variant"] == "fsq")
    assert fsq["fsq_levels"] == [8, 6, 5]  # nearest FSQ level set to K = 64 (log scale): 2^8
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["test_images"] == 64
    assert "| vq-rotation | 64 |" in (tmp_path / "results.md").read_text()


def test_ssim_speed_baseline_agrees_with_the_metrics(kodak_dir: Path, tmp_path: Path) -> None:
    """The float64 conv2d baseline the benchmark times is the same SSIM/MS-SSIM as training.metrics."""
    bench: Any = importlib.import_module("bench.ssim_speed")
    subset = tmp_path / "kodak"
    subset.mkdir()
    for f in sorted(kodak_dir.glob("*.png"))[:2]:
        (subset / f.name).symlink_to(f)
    out = tmp_path / "ssim.json"
    assert bench.main(["--data", str(subset), "--repeat", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2
    for name in ("SSIM", "MS-SSIM"):
        fig = result["figures"][name]
        assert fig["before_ms"] > 0 and fig["after_ms"] > 0 and fig["max_abs_diff"] < 1e-5, (name, fig)


def test_model_table_reads_every_shipped_models_reports(tmp_path: Path, capsys: Any) -> None:
    """The README's model table comes from committed reports: one for every shipped model, the figures as written."""
    from models.core.artefacts import pretrained_repo

    bench: Any = importlib.import_module("bench.model_table")
    shipped = sorted(p.name for p in pretrained_repo().iterdir() if (p / "manifest.json").is_file())
    assert sorted(bench.MODELS) == shipped
    out = tmp_path / "table.json"
    assert bench.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for record in json.loads(out.read_text())["models"]:
        report = json.loads((bench.QUALITY / f"{record['model']}_photos256val.json").read_text())
        assert record["psnr"] == report["tokenizer"]["psnr"]
        if record["tokens_256"] == 256:  # the f16 models' usage goal is counted over photos-extra too
            assert record["usage_val_extra"] is not None
        assert f"| **{record['model']}** | {record['tokens_256']:,} | {record['codebook_size']:,} |" in printed
