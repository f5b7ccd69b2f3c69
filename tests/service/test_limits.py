"""The pixel limit is the server's own: a huge image is refused from its header with our wording and
our limit, whatever Pillow's process-wide MAX_IMAGE_PIXELS says (the service sets it too), and a
decompression bomb is still refused before a pixel is decoded."""

from __future__ import annotations

import io
import struct
import time
import zlib
from functools import cache

import httpx
import numpy as np
import pytest
from PIL import Image

from clients.client import Client
from clients.errors import PayloadTooLargeError
from models.core import pixels
from service.settings import Settings

from .conftest import png_bytes
from .test_errors import assert_problem, encode_files

SIDE = 20_000
HUGE = f"image is {SIDE}×{SIDE} = {SIDE * SIDE} pixels; the limit is"
DEFAULT_LIMIT = Settings.model_fields["max_image_pixels"].default  # 4096² unless configured


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


@cache
def black_png(side: int) -> bytes:
    """A real 1-bit side×side black PNG, as `Image.new("1", (side, side)).save(buf, "PNG")` writes it
    (≈ 50 KB for 20000²), built row by row so the test never holds side² bytes."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte, then the packed bits
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row * min(1000, side - i)) for i in range(0, side, 1000)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def test_the_huge_png_is_a_real_png(monkeypatch: pytest.MonkeyPatch) -> None:
    small = black_png(1000)
    buf = io.BytesIO()
    Image.new("1", (1000, 1000)).save(buf, format="PNG")
    np.testing.assert_array_equal(pixels.decode_pixels(small), pixels.decode_pixels(buf.getvalue()))
    huge = black_png(SIDE)
    assert len(huge) < 100_000
    with pytest.raises(Image.DecompressionBombError, match="could be decompression bomb"):
        Image.open(io.BytesIO(huge))  # what answered before: Pillow's own check, inside Image.open
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(io.BytesIO(huge)) as im:
        assert im.size == (SIDE, SIDE) and im.mode == "1"


# --- through a real server ---


def test_huge_png_is_413_with_the_servers_limit(client: httpx.Client) -> None:
    t0 = time.monotonic()
    r = encode_files(client, black_png(SIDE))
    body = assert_problem(r, 413, f"{HUGE} {DEFAULT_LIMIT}")
    assert "decompression bomb" not in body["detail"].lower() and str(2 * DEFAULT_LIMIT) not in body["detail"]
    assert time.monotonic() - t0 < 2  # refused from the header, not after expanding 400 Mpx
    assert encode_files(client, png_bytes(np.full((32, 32, 3), 9, np.uint8))).status_code == 200


def test_configured_limit_is_the_one_reported(serve) -> None:  # type: ignore[no-untyped-def]
    s = serve(max_image_pixels=64 * 64)
    with httpx.Client(base_url=s.url, timeout=30) as c:
        assert_problem(encode_files(c, black_png(SIDE)), 413, f"{HUGE} 4096")
        # over the limit but under twice it, where Pillow's DecompressionBombWarning used to answer
        body = assert_problem(encode_files(c, png_bytes(np.zeros((65, 64, 3), np.uint8))), 413, "64×65 = 4160 pixels; the limit is 4096")
        assert "decompression bomb" not in body["detail"].lower()
        assert encode_files(c, png_bytes(np.zeros((64, 64, 3), np.uint8))).status_code == 200  # at the limit: served
    with Client(s.url, max_retries=0) as client, pytest.raises(PayloadTooLargeError) as info:
        client.encode(black_png(SIDE))
    assert f"{HUGE} 4096" in info.value.detail


# --- models.core.pixels directly ---


@pytest.mark.parametrize("pillow_limit", [None, 1000, Image.MAX_IMAGE_PIXELS], ids=["pillow-off", "pillow-tiny", "pillow-default"])
def test_prepare_refuses_with_our_limit_whatever_pillow_says(monkeypatch: pytest.MonkeyPatch, pillow_limit: int | None) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    for max_pixels in (pixels.MAX_PIXELS, 10**6):
        kw = {} if max_pixels == pixels.MAX_PIXELS else {"max_pixels": max_pixels}
        with pytest.raises(pixels.ImageTooLarge, match=f"^{HUGE} {max_pixels}$"):
            pixels.prepare(black_png(SIDE), downsample=8, resolution=256, resize="crop", **kw)  # type: ignore[arg-type]
        with pytest.raises(pixels.ImageTooLarge, match=f"^{HUGE} {max_pixels}$"):
            pixels.probe_image(black_png(SIDE), **kw)  # type: ignore[arg-type]


def test_pillows_limit_no_longer_refuses_what_ours_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow alone would refuse a 64×64 image (> 2·1000)
    out = pixels.prepare(png_bytes(np.full((64, 64, 3), 7, np.uint8)), downsample=8, resolution=64, resize="none", max_pixels=64 * 64)
    assert out.pixels.shape == (64, 64, 3) and out.source_size == (64, 64)


def _webp(mode: str, size: tuple[int, int], **save: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (10, 20, 30, 128)[: len(mode)]).save(buf, format="WEBP", **save)  # type: ignore[arg-type]
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "save", "chunk"),
    [("RGB", {"quality": 80}, b"VP8 "), ("RGB", {"lossless": True}, b"VP8L"), ("RGBA", {"quality": 80, "exif": b"Exif\0\0"}, b"VP8X")],
)
def test_webp_sizes_are_read_from_the_riff_header(mode: str, save: dict[str, object], chunk: bytes) -> None:
    data = _webp(mode, (37, 23), **save)
    if data[12:16] != chunk:
        pytest.skip(f"this libwebp wrote {data[12:16]!r}, not {chunk!r}")
    assert pixels._webp_size(data[:30]) == (37, 23)
    assert pixels.decode_pixels(data).shape == (23, 37, 3)
    with pytest.raises(pixels.ImageTooLarge, match=r"^image is 37×23 = 851 pixels; the limit is 850$"):
        pixels.decode_pixels(data, max_pixels=850)


def test_webp_bomb_is_refused_before_its_decoder_exists() -> None:
    """A lossless WebP header declaring a 16384×16384 canvas (1 GiB of RGBA were the decoder created)."""
    bits = (16384 - 1) | (16384 - 1) << 14
    payload = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 64
    data = b"RIFF" + struct.pack("<I", 4 + 8 + len(payload)) + b"WEBP" + b"VP8L" + struct.pack("<I", len(payload)) + payload
    with pytest.raises(pixels.ImageTooLarge, match=f"^image is 16384×16384 = {16384**2} pixels; the limit is {pixels.MAX_PIXELS}$"):
        pixels.probe_image(data)
