"""Image bytes <-> uint8 arrays, defended against hostile input. Pure functions; callers run them in
a thread pool (Pillow releases the GIL while decoding).

Colour rule: images with transparency (RGBA, LA, PA, P or RGB with a transparency key) are
composited on **white**; greyscale (1, L, I;16, I, F) is replicated to three channels (16-bit values
scaled by 1/257); CMYK and YCbCr go through Pillow's conversion to RGB. EXIF orientation is applied
before anything else.

The pixel count is checked from the header before any pixel is decoded, so a decompression bomb
(a small file that would expand to gigapixels) is refused without expanding it.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# defined here, not in settings: the client's local backend and dataset tokenization use this
# module without the server's settings (pydantic-settings)
ResizeMode = Literal["none", "crop", "pad"]

FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


class ImageError(ValueError):
    """Bytes that are not a decodable image of a supported format (400)."""


class ImageTooLarge(ValueError):
    """Pixel count (or resulting token grid) over the configured limit (413)."""


class ImageShapeError(ValueError):
    """A decodable image that does not fit the model under the requested resize mode (422)."""


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray  # uint8 (H, W, 3), H and W multiples of the model's downsample factor
    source_size: tuple[int, int]  # (height, width) after EXIF orientation, before resizing


@contextlib.contextmanager
def _pillow_errors() -> Iterator[None]:
    """Pillow's exceptions (and its decompression-bomb warning) as ImageError / ImageTooLarge."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (ImageError, ImageTooLarge):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"not an image in a supported format ({', '.join(FORMATS)})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise ImageError(f"cannot decode image: {exc}") from exc


def _open_header(data: bytes, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """(lazily opened image, (height, width) after EXIF orientation), from the header alone."""
    if not data:
        raise ImageError("empty image")
    im: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
    w, h = im.size  # from the header; nothing decoded yet
    if w <= 0 or h <= 0:
        raise ImageError(f"image has no pixels ({w}×{h})")
    if w * h > max_pixels:
        raise ImageTooLarge(f"image is {w}×{h} = {w * h} pixels; the limit is {max_pixels}")
    transposed = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap the axes
    return im, ((w, h) if transposed else (h, w))


def probe_image(data: bytes, *, max_pixels: int) -> tuple[int, int]:
    """(height, width) after EXIF orientation, read from the header without decoding a pixel; the
    same checks as `decode_image` up to there (format, empty, pixel limit). Raises ImageError /
    ImageTooLarge. A file whose body is corrupt passes: only decoding finds that."""
    with _pillow_errors():
        return _open_header(data, max_pixels)[1]


def decode_image(data: bytes, *, max_pixels: int, draft_for: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (RGB PIL image, EXIF-oriented, alpha on white; its full (height, width) after orientation).
    Raises ImageError / ImageTooLarge.

    `draft_for`: the short side the caller will resize to; JPEGs then decode at the smallest DCT
    scale (1/2, 1/4, 1/8) that still covers it, which is much faster for large photos."""
    with _pillow_errors():
        im, source = _open_header(data, max_pixels)
        w, h = im.size
        if draft_for is not None and im.format == "JPEG":
            scale = draft_for / min(w, h)
            if scale < 0.5:
                im.draft("RGB", (int(w * scale) + 1, int(h * scale) + 1))
        im.load()
        im = ImageOps.exif_transpose(im) or im
    return to_rgb(im), source


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    elif im.mode in ("RGB", "L") and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        scale = 257.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
        grey = np.clip(np.rint(a / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    return im.convert("RGB")


def prepare(data: bytes, *, downsample: int, resolution: int, resize: ResizeMode, max_pixels: int, max_grid_tokens: int) -> PreparedImage:
    """Bytes -> model input (H, W, 3) uint8 under the resize mode:
    `none`: sizes must be multiples of `downsample` (else ImageShapeError);
    `crop`: short side resized to `resolution` (bicubic), then a centred resolution×resolution crop;
    `pad`:  edge-replicated on the bottom and right up to the next multiple of `downsample`
            (the original pixels stay at the top-left, so `source_size` is all a client needs to crop back).
    """
    im, source = decode_image(data, max_pixels=max_pixels, draft_for=resolution if resize == "crop" else None)
    if resize == "crop":
        im = _resize_short_side_and_crop(im, resolution)
    pixels = np.asarray(im, dtype=np.uint8)
    h, w = pixels.shape[:2]
    if resize == "pad":
        ph, pw = -h % downsample, -w % downsample
        if ph or pw:
            pixels = np.pad(pixels, ((0, ph), (0, pw), (0, 0)), mode="edge")
            h, w = pixels.shape[:2]
    elif h % downsample or w % downsample:
        raise ImageShapeError(f"image is {w}×{h}; with resize=none both sides must be multiples of {downsample} (or use resize=pad|crop)")
    grid = (h // downsample) * (w // downsample)
    if grid > max_grid_tokens:
        raise ImageTooLarge(f"image of {w}×{h} gives {grid} tokens; the limit is {max_grid_tokens} a image")
    return PreparedImage(np.ascontiguousarray(pixels), source)


def _resize_short_side_and_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes (fast zlib level: the answer is transient)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
