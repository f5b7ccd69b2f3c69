"""The one pixel rule (models/core/pixels.py), checked pixel by pixel against independent constructions."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

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


# --- the simplejpeg fast path gives Pillow's pixels, and steps aside where it would not ---

PHOTOS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "photos256" / "val"


def _by_pillow(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], object]) -> object:
    with monkeypatch.context() as m:
        m.setattr(images, "_simplejpeg", None)
        return fn()


def _jpeg_variants() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    base = np.clip(rng.normal(128, 60, (9, 13, 3)), 0, 255).astype(np.uint8)
    photo = Image.fromarray(base).resize((1040, 720), Image.Resampling.BICUBIC)  # smooth + detailed enough for every DCT scale
    return {
        "420": encoded(photo, "JPEG", quality=90),
        "444": encoded(photo, "JPEG", quality=95, subsampling=0),
        "422": encoded(photo, "JPEG", subsampling=1),
        "progressive": encoded(photo, "JPEG", progressive=True),
        "grey": encoded(photo.convert("L"), "JPEG"),
        "odd-size": encoded(photo.crop((0, 0, 517, 333)), "JPEG", quality=70),
    }


@pytest.mark.parametrize("name", list(_jpeg_variants()))
@pytest.mark.parametrize("resize", ["none", "crop", "pad"])
def test_fast_jpeg_path_is_pillow_bit_for_bit(monkeypatch: pytest.MonkeyPatch, name: str, resize: str) -> None:
    data = _jpeg_variants()[name]
    assert images._simplejpeg is not None
    if resize == "none" and name == "odd-size":
        for decode in ("fast", "pillow"):  # 517×333 is refused the same way on both paths
            with pytest.raises(images.ImageShapeError, match="multiples of 8"):
                call = lambda: images.prepare(data, downsample=8, resolution=128, resize="none", **LIMITS)  # noqa: E731
                call() if decode == "fast" else _by_pillow(monkeypatch, call)
        return
    fast = images.prepare(data, downsample=8, resolution=128, resize=resize, **LIMITS)  # type: ignore[arg-type]
    slow = _by_pillow(monkeypatch, lambda: images.prepare(data, downsample=8, resolution=128, resize=resize, **LIMITS))  # type: ignore[arg-type]
    assert isinstance(slow, images.PreparedImage)
    assert fast.source_size == slow.source_size
    np.testing.assert_array_equal(fast.pixels, slow.pixels)  # crop: the DCT-scaled (draft) decode too


@pytest.mark.parametrize("size", [(128, 128), (171, 128), (128, 171), (128, 129)])
def test_crop_of_an_image_already_at_the_resolution_is_the_pillow_crop(monkeypatch: pytest.MonkeyPatch, size: tuple[int, int]) -> None:
    """Short side == resolution: no resampling, so the crop is a slice of the decoded array; it must be
    the pixels Pillow's resize-and-crop path gives (and each of the two paths really ran)."""
    rng = np.random.default_rng(1)
    photo = Image.fromarray(np.clip(rng.normal(128, 60, (9, 13, 3)), 0, 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    data = encoded(photo, "JPEG", quality=90)
    fits: list[int] = []
    real_fit = images.fit
    monkeypatch.setattr(images, "fit", lambda *a: fits.append(1) or real_fit(*a))
    fast = images.prepare(data, downsample=8, resolution=128, resize="crop", **LIMITS)  # type: ignore[arg-type]
    assert fits == []  # sliced
    slow = _by_pillow(monkeypatch, lambda: images.prepare(data, downsample=8, resolution=128, resize="crop", **LIMITS))  # type: ignore[arg-type]
    assert fits == [1]  # Pillow's image: the resize-and-crop path
    assert isinstance(slow, images.PreparedImage)
    assert fast.pixels.shape == (128, 128, 3) and fast.pixels.flags.c_contiguous
    assert fast.source_size == slow.source_size == (size[1], size[0])
    np.testing.assert_array_equal(fast.pixels, slow.pixels)


def test_fast_jpeg_path_on_real_photos(monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted(PHOTOS.glob("*.jpg"))[:40]
    if not files:
        pytest.skip(f"no photos in {PHOTOS}")
    calls = []
    real = images._simplejpeg.decode_jpeg  # type: ignore[union-attr]
    monkeypatch.setattr(images._simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    for f in files:
        data = f.read_bytes()
        fast = images.decode_pixels(data)
        slow = _by_pillow(monkeypatch, lambda data=data: images.decode_pixels(data))
        np.testing.assert_array_equal(fast, slow)
        assert fast.flags.writeable
    assert len(calls) == len(files)  # every one of them took the fast path


def test_fast_path_steps_aside_for_cmyk_rotations_and_corrupt_files(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = images._simplejpeg.decode_jpeg  # type: ignore[union-attr]
    monkeypatch.setattr(images._simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    arr = np.zeros((16, 24, 3), np.uint8)
    arr[:8] = (250, 20, 20)
    photo = Image.fromarray(arr)
    # CMYK: Pillow's inversion rule differs from libjpeg-turbo's, so Pillow decodes it
    cmyk = images.decode_pixels(encoded(photo.convert("CMYK"), "JPEG", quality=95))
    assert calls == [] and cmyk.shape == (16, 24, 3)
    # an EXIF rotation: Pillow decodes and rotates (orientation 6: 90° clockwise, axes swap)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = images.prepare(encoded(photo, "JPEG", quality=95, exif=exif), downsample=8, resolution=16, resize="none", **LIMITS)
    assert calls == [] and rotated.pixels.shape == (24, 16, 3) and rotated.source_size == (24, 16)
    assert rotated.pixels[:, -8:, 0].mean() > 200 and rotated.pixels[:, :8, 0].mean() < 60  # the red top is now on the right
    # truncated: simplejpeg (strict) refuses, Pillow then says what is wrong, in the same words as before
    whole = encoded(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=95)
    truncated = whole[: len(whole) // 2]
    with pytest.raises(images.ImageError, match="cannot decode image"):
        images.decode_pixels(truncated)
    assert calls == [1]
    with pytest.raises(images.ImageError, match="cannot decode image"):
        _by_pillow(monkeypatch, lambda: images.decode_pixels(truncated))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("resize", ["none", "crop", "pad"])
def test_a_header_read_once_prepares_the_same_pixels(fmt: str, resize: str) -> None:
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the header's size is swapped
    data = encoded(photo, fmt, exif=exif) if fmt == "JPEG" else encoded(photo, fmt)
    header = images.read_header(data, max_pixels=10**6)
    assert header.size == ((56, 40) if fmt == "JPEG" else (40, 56))
    once = images.prepare(data, downsample=8, resolution=32, resize=resize, header=header, **LIMITS)  # type: ignore[arg-type]
    twice = prep(data, resize, f=8)
    assert once.source_size == twice.source_size == header.size
    np.testing.assert_array_equal(once.pixels, twice.pixels)


def test_a_header_read_under_a_larger_limit_is_checked_again() -> None:
    data = encoded(Image.new("RGB", (64, 64)), "PNG")
    header = images.read_header(data, max_pixels=64 * 64)
    with pytest.raises(images.ImageTooLarge, match="limit is 4095"):
        images.prepare(data, downsample=8, resolution=32, resize="none", max_pixels=64 * 64 - 1, header=header)
