from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import create_tokenizer
from training.evaluate import EvalOptions, encode_at_rate, evaluate, format_table, pad_to_multiple, reconstruct, token_bpp

from .conftest import TINY


def test_pad_rule_crops_back_to_the_original_size(kodak_dir: Path) -> None:
    model = create_tokenizer("cifar-fsq", **TINY)
    img = np.array(Image.open(kodak_dir / "kodim01.png").convert("RGB"))[:37, :50]  # 37 × 50: not multiples of 4
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    padded = pad_to_multiple(x.float(), 4)
    assert padded.shape[-2:] == (40, 52)
    torch.testing.assert_close(padded[..., :37, :50], x.float())
    torch.testing.assert_close(padded[..., 37:, :50], x.float()[..., [35, 34, 33], :])  # reflected rows
    rec, counts = reconstruct(model, x)
    assert rec.shape == x.shape and rec.dtype == torch.uint8
    assert int(counts.sum()) == 10 * 13  # tokens of the padded grid
    assert token_bpp(37, 50, 4, 1000) == pytest.approx(130 * np.log2(1000) / (37 * 50))


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_codec_rate_search_stays_under_target(kodak_dir: Path, fmt: str) -> None:
    img = np.array(Image.open(kodak_dir / "kodim05.png").convert("RGB"))[:128, :128]
    low, bpp_low, q_low = encode_at_rate(img, fmt, 0.6)
    _, bpp_high, q_high = encode_at_rate(img, fmt, 2.0)
    assert bpp_low <= 0.6 and bpp_high <= 2.0 and q_high > q_low
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, quality=q_high + 1)
    if q_high < 100:
        assert len(buf.getvalue()) * 8 / img[..., 0].size > 2.0  # the next quality up would be over the rate
    assert low.shape == img.shape


def test_evaluate_report_on_real_images(kodak_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_tokenizer("cifar-fsq", **TINY)
    report = evaluate(model, kodak_dir, EvalOptions(limit=2, compare_codecs=True, fid_min_images=100))
    t = report["tokenizer"]
    assert report["images"] == 2 and report["nominal_bpp"] == pytest.approx(np.log2(1000) / 16)
    assert 0 < t["usage"] <= 1 and t["perplexity"] >= 1 and t["rfid"] is None
    assert "2 images < 100" in report["rfid_note"]
    assert report["jpeg"]["bpp"] <= t["bpp"] and report["webp"]["bpp"] <= t["bpp"]
    assert report["jpeg"]["psnr"] > t["psnr"]  # an untrained tokenizer loses to JPEG
    assert "JPEG (Pillow)" in format_table(report)
