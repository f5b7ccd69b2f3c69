"""PSNR / SSIM / MS-SSIM against scikit-image (an independent implementation) on real photos."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from training.metrics import ms_ssim, psnr, ssim


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.array(Image.open(buf).convert("RGB"))


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def kodak_pair(kodak_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    img = np.array(Image.open(kodak_dir / "kodim23.png").convert("RGB"))[100:356, 200:456]
    return img, _jpeg(img, 20)


def test_psnr_matches_skimage(kodak_pair: tuple[np.ndarray, np.ndarray], photos_val_dir: Path) -> None:
    ref, test = kodak_pair
    assert float(psnr(_chw(ref), _chw(test))) == pytest.approx(peak_signal_noise_ratio(ref, test, data_range=255), abs=1e-6)
    photo = np.array(Image.open(sorted(photos_val_dir.glob("*.jpg"))[0]).convert("RGB"))
    noisy = _jpeg(photo, 5)
    assert float(psnr(_chw(photo), _chw(noisy))) == pytest.approx(peak_signal_noise_ratio(photo, noisy, data_range=255), abs=1e-6)


@pytest.mark.parametrize("quality", [5, 50])
def test_ssim_matches_skimage(kodak_pair: tuple[np.ndarray, np.ndarray], quality: int) -> None:
    ref = kodak_pair[0]
    test = _jpeg(ref, quality)
    expected = structural_similarity(
        ref, test, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1
    )
    assert float(ssim(_chw(ref), _chw(test))) == pytest.approx(expected, abs=1e-5)  # float32: SSIM reported to 3 decimals


def test_ms_ssim_orders_quality_and_needs_size(kodak_pair: tuple[np.ndarray, np.ndarray]) -> None:
    ref, _ = kodak_pair
    x = _chw(ref)
    same = ms_ssim(x, x)
    assert same is not None and float(same) == pytest.approx(1.0, abs=1e-9)
    low, high = ms_ssim(x, _chw(_jpeg(ref, 5))), ms_ssim(x, _chw(_jpeg(ref, 60)))
    assert low is not None and high is not None
    assert 0.5 < float(low) < float(high) < 1.0
    assert ms_ssim(x[..., :100, :100], x[..., :100, :100]) is None


def test_psnr_of_identical_images_is_infinite(kodak_pair: tuple[np.ndarray, np.ndarray]) -> None:
    x = _chw(kodak_pair[0])
    assert torch.isinf(psnr(x, x)).all()
