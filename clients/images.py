"""Image helpers for the clients. The decoding and resize rules themselves live in one place,
`service.images` (torch-free), so the local backend and dataset tokenization preprocess exactly
as the server does and every engine yields the same tokens."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

ResizeMode = Literal["none", "crop", "pad"]
RESIZE_MODES: tuple[str, ...] = ("none", "crop", "pad")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
MAX_PIXELS = 8192 * 8192  # refuse decompression bombs (checked from the header, before decoding)
MAX_GRID_TOKENS = 1 << 30  # offline jobs have no per-request token budget

if TYPE_CHECKING:
    from service.images import PreparedImage


class ImageError(ValueError):
    """A caller's image that cannot be used (wrong dtype or shape)."""


def prepare(data: bytes, *, downsample: int, resolution: int, resize: str, max_pixels: int = MAX_PIXELS) -> PreparedImage:
    """Encoded bytes -> model input uint8 (H, W, 3) and the source (height, width), by the service's rules."""
    from service import images as _service_images  # imported on use: the HTTP client does not need it

    if resize not in RESIZE_MODES:
        raise ImageError(f"unknown resize mode {resize!r}; expected one of {', '.join(RESIZE_MODES)}")
    return _service_images.prepare(
        data,
        downsample=downsample,
        resolution=resolution,
        resize=resize,  # type: ignore[arg-type]
        max_pixels=max_pixels,
        max_grid_tokens=MAX_GRID_TOKENS,
    )


def source_size(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) after EXIF orientation from the header alone, by the service's rules (what a
    server reports as `source_size`); raises what `prepare` raises for an unreadable header."""
    from service import images as _service_images

    return _service_images.probe_image(data, max_pixels=max_pixels)


def image_errors() -> tuple[type[Exception], ...]:
    """What `prepare` raises for a bad image: undecodable (400), too large (413), wrong shape (422)."""
    from service import images as _service_images

    return (_service_images.ImageError, _service_images.ImageTooLarge, _service_images.ImageShapeError, ImageError)


def to_rgb(image: Image.Image) -> np.ndarray:
    """PIL image -> uint8 (H, W, 3), by the service's colour rule (alpha on white, grey replicated)."""
    from PIL import ImageOps

    from service import images as _service_images

    image = ImageOps.exif_transpose(image) or image
    return np.asarray(_service_images.to_rgb(image), dtype=np.uint8)


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


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes: lossless, fast compression (it only crosses a network)."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any image) bytes from the server -> uint8 (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
