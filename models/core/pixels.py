"""The one pixel rule: image bytes -> uint8 RGB arrays -> model input, for every path in vqtok
(training, evaluation, export parity, the service, the client's local backend, dataset tokenization).
Pure functions, torch-free, defended against hostile input; callers run them in threads or
processes (Pillow releases the GIL while decoding).

Colour rule: EXIF orientation is applied first; images with transparency (RGBA, LA, PA, P or RGB
with a transparency key) are composited on **white**; greyscale (1, L, I;16, I, F) is replicated to
three channels (16-bit values scaled by 1/257); CMYK and YCbCr go through Pillow's conversion.

The pixel count is checked from the header before any pixel is decoded, so a decompression bomb
(a small file that would expand to gigapixels) is refused without expanding it, with our wording and
the caller's limit (`max_pixels`): Pillow's own check at open (`Image.MAX_IMAGE_PIXELS`, process-wide,
which the service sets too) would otherwise refuse first, in Pillow's words and at Pillow's number.

JPEGs (YCbCr or greyscale, no EXIF rotation) decode through simplejpeg (libjpeg-turbo without Pillow's
per-image overhead, so the decode that every request and dataset image pays is cheaper); its output is the same
array Pillow decodes, full-size and DCT-scaled alike (tested bit for bit), so the path taken never
changes a token. Anything it does not take (other formats, CMYK, EXIF rotations, simplejpeg missing,
a file it cannot decode cleanly) goes through Pillow as before, errors and wording included.

Value rule: uint8 v <-> model float x = v / 127.5 − 1 in [−1, 1]; back: round((x + 1)·127.5)
after clamping to [−1, 1] (models/tokenizer.py holds it for the torch side).
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, ImageShapeError, ImageTooLarge

try:
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel: Pillow decodes every JPEG
    _simplejpeg = None

ResizeMode = Literal["none", "crop", "pad"]
RESIZE_MODES: tuple[ResizeMode, ...] = ("none", "crop", "pad")
FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # what is decoded; anything else is refused (415 on the service)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})  # the file names datasets list
MAX_PIXELS = 8192 * 8192  # default decoded-size limit for offline work (the service sets its own)
# The one resize default of the HTTP API, the playground, the clients, the local backend and `vqtok tokenize`:
# crop accepts every readable photo (short side to the model's resolution, centre square); none and pad
# keep whole images and are asked for by name.
DEFAULT_RESIZE: ResizeMode = "crop"
# The service's default per-image limits (service.settings), here so that the local backend applies the same rule.
SERVICE_MAX_IMAGE_PIXELS = 4096 * 4096
SERVICE_MAX_GRID_TOKENS = 128 * 128


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray  # uint8 (H, W, 3), H and W multiples of the model's downsample factor
    source_size: tuple[int, int]  # (height, width) after EXIF orientation, before resizing


def resize_mode(value: str) -> ResizeMode:
    if value not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {value!r}; expected one of {', '.join(RESIZE_MODES)}")
    return cast(ResizeMode, value)


# --- decoding ---


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


def _check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise ImageTooLarge(f"image is {w}×{h} = {w * h} pixels; the limit is {max_pixels}")


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """A WebP's canvas (width, height) from its first 30 bytes (VP8, VP8L or VP8X), None if unreadable."""
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack_from("<HH", head, 26)
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = struct.unpack_from("<I", head, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _open_lazily(data: bytes, max_pixels: int) -> Image.Image:
    """`Image.open(BytesIO(data), formats=FORMATS)` less the size check Image.open makes once a format's
    reader has parsed the header: that check is against Pillow's process-wide MAX_IMAGE_PIXELS and
    raises Pillow's DecompressionBomb wording before ours could run; `_open_header` makes the same
    check right after, from the same header, against the caller's `max_pixels`. The PNG, JPEG and BMP
    readers allocate nothing while parsing a header; the WebP reader creates its decoder (which
    allocates the canvas) in it, so a WebP's size is checked here first, from its RIFF header."""
    Image.preinit()
    prefix = data[:16]
    for fmt in FORMATS:
        if fmt not in Image.OPEN:
            Image.init()
        if fmt not in Image.OPEN:  # a Pillow built without this format
            continue
        factory, accept = Image.OPEN[fmt]
        accepted = accept is None or accept(prefix)
        if isinstance(accepted, str) or not accepted:  # a str: the format's support is not installed
            continue
        if fmt == "WEBP" and (size := _webp_size(data[:30])) is not None:
            _check_pixels(*size, max_pixels)
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open takes for "not this format"
            continue
    raise UnidentifiedImageError("cannot identify image file")


@dataclass(frozen=True)
class Header:
    """What an image's header says, read once (`read_header`) and handed to `prepare` so that the
    header is not parsed twice (Pillow's JPEG header reader is pure Python, and a one-image request
    would pay for it twice)."""

    image: Image.Image  # lazily opened: nothing decoded yet; decoding it consumes it
    size: tuple[int, int]  # (height, width) after EXIF orientation
    orientation: int  # EXIF orientation 1-8


def _open_header(data: bytes, max_pixels: int) -> Header:
    if not data:
        raise ImageError("empty image")
    im = _open_lazily(data, max_pixels)
    w, h = im.size  # from the header; nothing decoded yet
    if w <= 0 or h <= 0:
        raise ImageError(f"image has no pixels ({w}×{h})")
    _check_pixels(w, h, max_pixels)
    orientation = im.getexif().get(0x0112, 1)
    transposed = orientation in (5, 6, 7, 8)  # EXIF orientations that swap the axes
    return Header(im, (w, h) if transposed else (h, w), orientation)


def read_header(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Header:
    """The header, without decoding a pixel; the same checks as `decode_image` up to there (format,
    empty, pixel limit). Raises ImageError / ImageTooLarge. A file whose body is corrupt passes:
    only decoding finds that. Use the result for one `prepare` of the same bytes, at most."""
    with _pillow_errors():
        return _open_header(data, max_pixels)


def probe_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) after EXIF orientation, read from the header (see `read_header`)."""
    return read_header(data, max_pixels=max_pixels).size


def _draft_size(w: int, h: int, draft_for: int | None) -> tuple[int, int] | None:
    """The smallest decode size Pillow's JPEG draft (and simplejpeg's min_width/min_height) may pick
    for a caller that resizes the short side to `draft_for`; None: decode at full size."""
    if draft_for is None:
        return None
    scale = draft_for / min(w, h)
    return (int(w * scale) + 1, int(h * scale) + 1) if scale < 0.5 else None


def _decode_jpeg_fast(data: bytes, im: Image.Image, orientation: int, draft_for: int | None) -> np.ndarray | None:
    """uint8 (H, W, 3) through simplejpeg where it gives Pillow's exact pixels (a YCbCr or greyscale
    JPEG without an EXIF rotation), else None: the caller decodes with Pillow."""
    if _simplejpeg is None or im.format != "JPEG" or im.mode not in ("RGB", "L") or orientation != 1:
        return None
    size = _draft_size(*im.size, draft_for)
    limits = {"min_width": size[0], "min_height": size[1]} if size else {}
    try:
        return cast(np.ndarray, _simplejpeg.decode_jpeg(data, colorspace="RGB", **limits))
    except ValueError:  # corrupt or truncated (strict mode): Pillow decodes it, or says why it cannot
        return None


def _decode(
    data: bytes, max_pixels: int, draft_for: int | None, header: Header | None = None
) -> tuple[Image.Image | np.ndarray, tuple[int, int]]:
    """(the decoded image: RGB PIL image or uint8 (H, W, 3) array, EXIF-oriented, by the colour rule;
    its full (height, width) after orientation). `header`: `read_header(data)`'s, if already read."""
    with _pillow_errors():
        if header is None:
            header = _open_header(data, max_pixels)
        else:
            _check_pixels(*header.image.size, max_pixels)  # it may have been read under another limit
        im, source, orientation = header.image, header.size, header.orientation
        fast = _decode_jpeg_fast(data, im, orientation, draft_for)
        if fast is not None:
            return fast, source
        if im.format == "JPEG" and (size := _draft_size(*im.size, draft_for)) is not None:
            im.draft("RGB", size)
        im.load()
        if orientation != 1:  # exif_transpose copies the image even when there is nothing to do
            im = ImageOps.exif_transpose(im) or im
        return to_rgb(im), source


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS, draft_for: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (RGB PIL image, EXIF-oriented, by the colour rule; its full (height, width) after
    orientation). Raises ImageError / ImageTooLarge.

    `draft_for`: the short side the caller will resize to; JPEGs then decode at the smallest DCT
    scale (1/2, 1/4, 1/8) that still covers it, which is much faster for large photos."""
    image, source = _decode(data, max_pixels, draft_for)
    return (Image.fromarray(image, "RGB") if isinstance(image, np.ndarray) else image), source


def decode_pixels(data: bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes -> uint8 (H, W, 3) by the colour rule, full size (a writable copy)."""
    image, _ = _decode(data, max_pixels, None)
    return image if isinstance(image, np.ndarray) else np.array(image, dtype=np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """A decoded PIL image (any mode) -> RGB by the colour rule (no EXIF handling: see `orient`)."""
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


def pil_to_array(image: Image.Image) -> np.ndarray:
    """A caller's PIL image -> uint8 (H, W, 3): EXIF orientation, then the colour rule."""
    image = ImageOps.exif_transpose(image) or image
    return np.asarray(to_rgb(image), dtype=np.uint8)


def as_array(image: np.ndarray) -> np.ndarray:
    """A caller's numpy image: uint8 (H, W, 3), or (H, W) greyscale replicated -> uint8 (H, W, 3)."""
    if image.dtype != np.uint8:
        raise ImageError(f"numpy images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"numpy images must be (H, W, 3) or (H, W), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError("empty (0-pixel) image")
    return np.ascontiguousarray(image)


# --- geometry ---


def resize_short_side(im: Image.Image, size: int) -> Image.Image:
    """Short side to `size` (bicubic), aspect kept; the long side is at least `size`."""
    w, h = im.size
    if min(w, h) == size:
        return im
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    return im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)


def fit(im: Image.Image, height: int, width: int) -> Image.Image:
    """Resize to cover (height, width) with the aspect kept (bicubic), then crop the centre."""
    w, h = im.size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - width) // 2, (nh - height) // 2
    return im.crop((left, top, left + width, top + height))


def center_crop(im: Image.Image, size: int) -> Image.Image:
    """The `crop` resize mode: short side to `size`, then the central size×size window."""
    return fit(im, size, size)


def pad_to_multiple(pixels: np.ndarray, multiple: int) -> np.ndarray:
    """Edge-replicate the bottom and right up to the next multiple (original pixels stay top-left)."""
    h, w = pixels.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        pixels = np.pad(pixels, ((0, ph), (0, pw), (0, 0)), mode="edge")
    return pixels


def prepare(
    data: bytes,
    *,
    downsample: int,
    resolution: int,
    resize: ResizeMode,
    max_pixels: int = MAX_PIXELS,
    max_grid_tokens: int = 1 << 30,
    header: Header | None = None,
) -> PreparedImage:
    """Bytes -> model input (H, W, 3) uint8 under the resize mode:
    `none`: sizes must be multiples of `downsample` (else ImageShapeError);
    `crop`: short side resized to `resolution` (bicubic), then a centred resolution×resolution crop;
    `pad`:  edge-replicated on the bottom and right up to the next multiple of `downsample`
            (the original pixels stay at the top-left, so `source_size` is all a client needs to crop back).
    `header`: `read_header(data)`'s result when the caller has read it already (it is not read again).
    """
    if resize not in RESIZE_MODES:
        raise ImageError(f"unknown resize mode {resize!r}; expected one of {', '.join(RESIZE_MODES)}")
    image, source = _decode(data, max_pixels, resolution if resize == "crop" else None, header)
    if resize == "crop" and isinstance(image, np.ndarray) and min(image.shape[:2]) == resolution:
        # the short side is already `resolution`: `fit` resizes nothing and crops the centre, which is
        # a slice (the same pixels, without Pillow's copies in and out, a large part of a small photo's cost)
        h, w = image.shape[:2]
        top, left = (h - resolution) // 2, (w - resolution) // 2
        image = image[top : top + resolution, left : left + resolution]
    elif resize == "crop":
        pil = Image.fromarray(image, "RGB") if isinstance(image, np.ndarray) else image
        image = center_crop(pil, resolution)
    pixels = image if isinstance(image, np.ndarray) else np.asarray(image, dtype=np.uint8)
    if resize == "pad":
        pixels = pad_to_multiple(pixels, downsample)
    h, w = pixels.shape[:2]
    if h % downsample or w % downsample:
        raise ImageShapeError(f"image is {w}×{h}; with resize=none both sides must be multiples of {downsample} (or use resize=pad|crop)")
    grid = (h // downsample) * (w // downsample)
    if grid > max_grid_tokens:
        raise ImageTooLarge(f"image of {w}×{h} gives {grid} tokens; the limit is {max_grid_tokens} a image")
    return PreparedImage(np.ascontiguousarray(pixels), source)


# --- encoding ---


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes (fast zlib level: the answer is transient)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any image) bytes from a server -> uint8 (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
