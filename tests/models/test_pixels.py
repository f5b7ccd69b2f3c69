"""The one pixel rule (models/core/pixels.py), checked pixel by pixel against independent constructions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.core import pixels as images

LIMITS = dict(max_pixels=10_000_000, max_grid_tokens=100_000)


def encoded(im: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def prep(data: bytes, resize: str = "none", f: int = 4, res: int = 32) -> images.PreparedImage:
    return images.prepare(data, downsample=f, resolution=res, resize=resize, **LIMITS)  # type: ignore[arg-type]


def test_alpha_is_composited_on_white() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red 200
    rgba[:4, ..., 3] = 0  # top half transparent
    rgba[4:, ..., 3] = 128  # bottom half half-opaque
    out = prep(encoded(Image.fromarray(rgba, "RGBA"))).pixels
    assert (out[:4] == 255).all()  # fully transparent -> white
    np.testing.assert_allclose(out[4:, :, 0], 200 * 128 / 255 + 255 * 127 / 255, atol=1)
    np.testing.assert_allclose(out[4:, :, 1], 255 * 127 / 255, atol=1)


def test_greyscale_and_16_bit_are_replicated() -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    out = prep(encoded(Image.fromarray(grey, "L"))).pixels
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))
    deep = (grey.astype(np.uint16) * 257).astype(np.uint16)
    out16 = prep(encoded(Image.fromarray(deep))).pixels  # uint16 -> mode I;16
    np.testing.assert_array_equal(out16, np.repeat(grey[..., None], 3, axis=2))


def test_palette_with_transparency() -> None:
    p = Image.new("P", (8, 8), 0)
    p.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    p.info["transparency"] = 0
    out = prep(encoded(p, transparency=0)).pixels
    assert (out == 255).all()


def test_exif_orientation_is_applied() -> None:
    a = np.zeros((8, 12, 3), np.uint8)
    a[0, 0] = (255, 0, 0)  # red top-left pixel in the stored (landscape) image
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # stored pixels must be rotated 90° clockwise for display
    out = prep(encoded(im, "PNG", exif=exif.tobytes()))
    assert out.pixels.shape == (12, 8, 3) and out.source_size == (12, 8)
    expected = np.rot90(a, k=-1)  # 90° clockwise: the top-left pixel lands top-right
    np.testing.assert_array_equal(out.pixels, expected)
    assert tuple(out.pixels[0, -1]) == (255, 0, 0)


def test_pad_and_crop_rules() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (10, 7, 3), dtype=np.uint8)
    out = prep(encoded(Image.fromarray(a)), "pad")
    assert out.pixels.shape == (12, 8, 3) and out.source_size == (10, 7)
    np.testing.assert_array_equal(out.pixels, np.pad(a, ((0, 2), (0, 1), (0, 0)), mode="edge"))
    wide = rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)
    out = prep(encoded(Image.fromarray(wide)), "crop", res=20)
    expected = np.asarray(Image.fromarray(wide).resize((40, 20), Image.Resampling.BICUBIC, reducing_gap=3.0))[:, 10:30]
    np.testing.assert_array_equal(out.pixels, expected)
    assert out.source_size == (40, 80)


def test_large_jpeg_crop_uses_draft_but_keeps_source_size() -> None:
    big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (1024, 1536, 3), dtype=np.uint8))
    out = prep(encoded(big, "JPEG"), "crop", res=32)
    assert out.pixels.shape == (32, 32, 3) and out.source_size == (1024, 1536)


@pytest.mark.parametrize("resize", ["none", "pad", "crop"])
def test_limits_checked_before_decoding(resize: str) -> None:
    data = encoded(Image.new("RGB", (200, 100)))
    with pytest.raises(images.ImageTooLarge):
        images.prepare(data, downsample=4, resolution=32, resize=resize, max_pixels=19_999, max_grid_tokens=10**6)  # type: ignore[arg-type]
    with pytest.raises(images.ImageError):
        prep(data[:100])
