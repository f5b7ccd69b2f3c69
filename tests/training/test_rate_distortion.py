"""bench.rate_distortion end to end on a sliver of the real sets with a tiny model: the JSON, both
figures, a sweep point checked against PSNR written out in numpy, and the model point equal to
`vqtok eval`'s own report (the script reuses training.evaluate, never a copy of it)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.presets import create_tokenizer
from models.tokenizer import Tokenizer
from training.evaluate import EvalOptions, encode_at_quality, evaluate

from .conftest import TINY

pytest.importorskip("matplotlib", reason="matplotlib (the test extra) draws the figures")


def _load_bench() -> object:
    return importlib.import_module("bench.rate_distortion")


@pytest.mark.slow
def test_rate_distortion_script_on_real_images(kodak_dir: Path, photos_val_dir: Path, tmp_path: Path) -> None:
    kodak = tmp_path / "kodak"
    kodak.mkdir()
    for name in ("kodim05.png", "kodim14.png", "kodim23.png"):  # the crop images; the sweep uses the first
        (kodak / name).symlink_to(kodak_dir / name)
    torch.manual_seed(0)
    model_dir = create_tokenizer("cifar-fsq", **TINY).save_pretrained(tmp_path / "tiny-fsq", model_card=False)
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--kodak", str(kodak), "--val", str(photos_val_dir), "--kodak-limit", "1", "--val-limit", "2"]
    argv += ["--jpeg-qualities", "10", "60", "--webp-qualities", "10", "60", "--no-fid", "--batch-size", "2"]
    argv += ["--json", str(out / "rd.json"), "--figure", str(out / "rd.png"), "--crops", str(out / "crops.png")]
    lines: list[str] = []
    results = _load_bench().main(argv, log=lines.append)  # type: ignore[attr-defined]

    saved = json.loads((out / "rd.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for png in ("rd.png", "crops.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 500
    assert list(saved["datasets"]) == ["Kodak", "photos256/val"]
    val = saved["datasets"]["photos256/val"]
    assert val["images"] == 2 and list(val["models"]) == ["tiny-fsq (cifar-fsq)"]
    for key in ("jpeg", "webp"):
        low, high = val["sweeps"][key]
        assert [low["quality"], high["quality"]] == [10, 60] and low["bpp"] < high["bpp"] and low["psnr"] < high["psnr"]
        assert low["ssim"] is None  # the sweep skips SSIM/MS-SSIM by design; the equal-rate rows have them

    originals = [np.array(Image.open(p).convert("RGB")) for p in sorted(photos_val_dir.glob("*"))[:2]]
    psnrs, bpps = [], []
    for img in originals:
        decoded, bpp = encode_at_quality(img, "JPEG", 10)
        mse = np.mean((img.astype(np.float64) - decoded.astype(np.float64)) ** 2)
        psnrs.append(10 * np.log10(255.0**2 / mse))
        bpps.append(bpp)
    assert val["sweeps"]["jpeg"][0]["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-6)
    assert val["sweeps"]["jpeg"][0]["bpp"] == pytest.approx(np.mean(bpps))

    direct = evaluate(
        Tokenizer.from_pretrained(model_dir), photos_val_dir, EvalOptions(limit=2, compare_codecs=True, fid=False, device="cpu")
    )
    row = val["models"]["tiny-fsq (cifar-fsq)"]
    for key in ("tokenizer", "jpeg", "webp"):
        assert row[key]["psnr"] == pytest.approx(direct[key]["psnr"]) and row[key]["bpp"] == pytest.approx(direct[key]["bpp"])
        assert row[key]["rfid"] is None and row[key]["ssim"] is not None
    table = next(line for line in lines if line.startswith("| set |"))
    assert "| photos256/val | WebP at equal rate |" in table and "KID" in table

    # a second model beside the first: the sweeps and the first model's rows come from the earlier JSON,
    # the second model's val row from its own `vqtok eval --compare-codecs` report, only its Kodak row is new
    torch.manual_seed(1)
    second = create_tokenizer("cifar-fsq", **TINY).save_pretrained(tmp_path / "tiny-fsq-b", model_card=False)
    report = evaluate(Tokenizer.from_pretrained(second), photos_val_dir, EvalOptions(limit=2, compare_codecs=True, fid=False, device="cpu"))
    report["model"] = str(second)
    (tmp_path / "b.val.json").write_text(json.dumps(report))
    again = [str(out / "rd2.json") if a == str(out / "rd.json") else a for a in argv]
    again += ["--model", str(second), "--reuse", str(out / "rd.json"), "--report", f"photos256/val={tmp_path / 'b.val.json'}"]
    lines2: list[str] = []
    both = _load_bench().main(again, log=lines2.append)  # type: ignore[attr-defined]
    for name in ("Kodak", "photos256/val"):
        assert both["datasets"][name]["sweeps"] == saved["datasets"][name]["sweeps"]
        assert both["datasets"][name]["models"]["tiny-fsq (cifar-fsq)"] == saved["datasets"][name]["models"]["tiny-fsq (cifar-fsq)"]
    assert both["datasets"]["photos256/val"]["models"]["tiny-fsq-b (cifar-fsq)"]["tokenizer"] == report["tokenizer"]
    assert "Kodak: tiny-fsq-b (cifar-fsq) from its `vqtok eval` report" not in lines2
    assert "photos256/val: tiny-fsq-b (cifar-fsq) from its `vqtok eval` report" in lines2
    with pytest.raises(SystemExit):
        _load_bench().main([*again, "--report", f"Kodak={tmp_path / 'b.val.json'}", "--report", "Nowhere=x.json"])  # type: ignore[attr-defined]
