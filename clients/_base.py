"""What the sync and async clients share: input preparation, request building, response parsing,
request splitting. The two clients differ only in how they send requests and wait."""

from __future__ import annotations

import base64
import io
import mimetypes
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
from PIL import Image

from models.core import pixels as _images
from models.core.layouts import Layout, SequenceError

from .errors import INVALID_SEQUENCE, APIStatusError, InvalidSequenceError, VqtokError, error_from_response

NPY = "application/x-npy"
JSON = "application/json"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)  # encode of a large batch on CPU can take a while
DEFAULT_MAX_RETRIES = 2

SingleImage = str | os.PathLike[str] | bytes | bytearray | Image.Image  # always one image
ImageInput = SingleImage | np.ndarray  # an array is one image (H, W, 3) or (H, W), or a batch (B, H, W, 3)
Images = ImageInput | Sequence[ImageInput]
Wire = Literal["npy", "json"]
Output = Literal["pil", "numpy"]
DEFAULT_RESIZE = _images.DEFAULT_RESIZE  # "crop", as the server's default, the playground's and `vqtok tokenize`'s
LayoutArg = str | Layout  # a preset's name (the server builds the layout) or a Layout (built here: any preset, emu3 too)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vqtok")
    except Exception:  # not installed (a source checkout): still send a well-formed agent
        return "0.0.0"


def user_agent() -> str:
    return f"vqtok-python/{_version()} httpx/{httpx.__version__} python/{platform.python_version()}"


@dataclass(frozen=True)
class ModelCard:
    """One served model, as `GET /v1/models` describes it. `raw` keeps every field the server sent."""

    name: str
    codebook_size: int
    downsample: int
    resolution: int
    ready: bool
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ModelCard:
        return cls(
            name=str(body.get("name", "")),
            codebook_size=int(body.get("codebook_size") or 0),  # None while a model is loading or failed
            downsample=int(body.get("downsample") or 0),
            resolution=int(body.get("resolution") or 0),
            ready=bool(body.get("ready", True)),
            raw=body,
        )


@dataclass(frozen=True)
class ImagePart:
    """One image ready for the wire, with its position in the caller's input."""

    index: int
    filename: str
    data: bytes
    content_type: str


def _sniff(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def as_image_list(images: Images) -> tuple[bool, list[ImageInput]]:
    """(was it a single image, the images as a list). A (B, H, W, 3) array is a batch."""
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return False, list(images)
        return True, [images]
    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)):
        return True, [images]
    return False, list(images)


def prepare_image(index: int, image: ImageInput) -> ImagePart:
    """Any input -> bytes to upload. Encoded files go as they are; pixels go as lossless PNG."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise VqtokError(f"cannot read image {path}: {exc.strerror or exc}") from exc
        ctype = mimetypes.guess_type(path.name)[0] or _sniff(data)
        return ImagePart(index, path.name, data, ctype)
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        return ImagePart(index, f"image{index}", data, _sniff(data))
    if isinstance(image, Image.Image):
        return ImagePart(index, f"image{index}.png", _images.encode_png(_images.pil_to_array(image)), "image/png")
    if isinstance(image, np.ndarray):
        try:
            pixels = _images.as_array(image)
        except _images.ImageError as exc:
            raise VqtokError(str(exc)) from exc
        return ImagePart(index, f"image{index}.png", _images.encode_png(pixels), "image/png")
    raise TypeError(f"unsupported image input of type {type(image).__name__}: pass a path, bytes, a PIL image or a uint8 array")


def grid_group(part: ImagePart, resize: str | None) -> tuple[Any, ...]:
    """Images that will give the same token grid share a key: one npy answer holds one grid shape.
    Read from the header (and EXIF orientation) only; nothing is decoded."""
    if resize == "crop":
        return ("crop",)
    try:
        return _images.probe_image(part.data, max_pixels=1 << 62)  # the server judges the size
    except Exception:
        return ("unreadable", part.index)


def plan_encode(parts: Sequence[ImagePart], resize: str | None, max_images: int, max_bytes: int) -> list[list[ImagePart]]:
    """Requests for an encode call: parts grouped by expected grid, then cut to the request limits."""
    groups: dict[tuple[Any, ...], list[ImagePart]] = {}
    for part in parts:
        groups.setdefault(grid_group(part, resize), []).append(part)
    return [chunk for group in groups.values() for chunk in chunk_parts(group, max_images, max_bytes)]


def assemble(chunks: Sequence[Sequence[ImagePart]], results: Sequence[Sequence[np.ndarray]], count: int) -> list[np.ndarray]:
    """Per-request results back into input order."""
    out: list[np.ndarray | None] = [None] * count
    for chunk, grids in zip(chunks, results, strict=True):
        for part, grid in zip(chunk, grids, strict=True):
            out[part.index] = grid
    return filled(out)


def filled(slots: list[np.ndarray | None]) -> list[np.ndarray]:
    """A list filled slot by slot (results put back in input order), every slot now set."""
    done = [item for item in slots if item is not None]
    assert len(done) == len(slots), "a result is missing"
    return done


def chunk_parts(parts: Sequence[ImagePart], max_images: int, max_bytes: int) -> list[list[ImagePart]]:
    """Consecutive parts grouped under the server's per-request limits (a lone oversized image goes alone)."""
    chunks: list[list[ImagePart]] = []
    current: list[ImagePart] = []
    size = 0
    for part in parts:
        if current and (len(current) >= max_images or size + len(part.data) > max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append(part)
        size += len(part.data) + 512  # multipart headers per part
    if current:
        chunks.append(current)
    return chunks


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise VqtokError(f"the server sent an unreadable npy body: {exc}") from exc


@dataclass(frozen=True)
class RequestSpec:
    """Arguments for `httpx.Client.build_request` / `httpx.AsyncClient.build_request`."""

    method: str
    url: str
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class LayoutFields:
    """The layout fields of an encode request (the server builds the layout)."""

    name: str
    vocab_offset: int = 0
    max_grid: int | None = None

    def form(self) -> dict[str, str]:
        data = {"layout": self.name, "vocab_offset": str(self.vocab_offset)}
        if self.max_grid is not None:
            data["max_grid"] = str(self.max_grid)
        return data


def encode_request(
    parts: Sequence[ImagePart], model: str | None, resize: str | None, wire: Wire, layout: LayoutFields | None = None
) -> RequestSpec:
    data: dict[str, str] = {}
    if model:
        data["model"] = model
    if resize:
        data["resize"] = resize
    if layout is not None:
        data |= layout.form()
    files = [("images", (p.filename, p.data, p.content_type)) for p in parts]
    headers = {"Accept": NPY if wire == "npy" else JSON}
    return RequestSpec("POST", "/v1/encode", {"data": data, "files": files, "headers": headers})


def parse_encode(response: httpx.Response, count: int) -> list[np.ndarray]:
    """An encode answer -> one int32 (h, w) grid per image, in request order."""
    raise_for_status(response)
    if response.headers.get("content-type", "").split(";")[0].strip() == NPY:
        array = load_npy(response.content)
        if array.ndim != 3 or array.shape[0] != count:
            raise VqtokError(f"expected {count} token grids, the server sent an array of shape {array.shape}")
        return [np.ascontiguousarray(a, dtype=np.int32) for a in array]
    body = response.json()
    results = body.get("results", body.get("images"))
    if results is None:  # a single-image answer carries its grid at the top level
        results = [body]
    grids = [np.asarray(r["tokens"], dtype=np.int32) for r in results]
    if len(grids) != count or any(g.ndim != 2 for g in grids):
        raise VqtokError(f"expected {count} token grids, the server sent {len(grids)}")
    return grids


def parse_encode_sequences(response: httpx.Response, count: int) -> list[np.ndarray]:
    """An encode answer with a layout -> one int64 (L,) sequence per image, in request order."""
    raise_for_status(response)
    if response.headers.get("content-type", "").split(";")[0].strip() == NPY:
        array = load_npy(response.content)
        if array.ndim != 2 or array.shape[0] != count:
            raise VqtokError(f"expected {count} sequences, the server sent an array of shape {array.shape}")
        return [np.asarray(a, dtype=np.int64) for a in array]
    results = response.json().get("images") or []
    if len(results) != count or any("sequence" not in r for r in results):
        raise VqtokError(f"expected {count} sequences, the server sent {len(results)} images without them")
    return [np.asarray(r["sequence"], dtype=np.int64) for r in results]


# --- sequences -> images ---


@dataclass(frozen=True)
class SpanInfo:
    """One image span found in a sequence: `sequence[start:end]`, its grid [h, w], and what repair changed."""

    start: int
    end: int
    grid: tuple[int, int]
    changes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DecodedSequence:
    """What `decode_sequence` returns: one image per span (PIL images or uint8 (H, W, 3) arrays), in order."""

    images: list[Any]
    spans: list[SpanInfo]

    @property
    def repaired(self) -> bool:
        """Whether repair changed anything."""
        return any(s.changes for s in self.spans)

    def __len__(self) -> int:
        return len(self.images)


def sequence_ids(sequence: Sequence[int] | np.ndarray) -> list[int]:
    """An LLM's ids as a list of ints (a 1-D integer array, a list, or a torch tensor's `.tolist()`)."""
    array = np.asarray(sequence)
    if array.size and (array.ndim != 1 or not np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise VqtokError(f"a sequence is a 1-D list of integer ids, got {array.dtype} {array.shape}")
    return [int(i) for i in array.reshape(-1)]


def decode_sequence_request(
    ids: list[int],
    layout: str,
    vocab_offset: int,
    grid: tuple[int, int] | None,
    repair: bool,
    max_grid: int | None,
    model: str | None,
) -> RequestSpec:
    body: dict[str, Any] = {"sequence": ids, "layout": layout, "vocab_offset": vocab_offset, "repair": repair}
    if grid is not None:
        body["grid"] = [int(grid[0]), int(grid[1])]
    if max_grid is not None:
        body["max_grid"] = max_grid
    if model:
        body["model"] = model
    return RequestSpec("POST", "/v1/decode", {"json": body, "headers": {"Accept": JSON}})


def parse_decode_sequence(response: httpx.Response, output: Output) -> DecodedSequence:
    raise_for_status(response)
    body = response.json()
    spans = [
        SpanInfo(int(s["start"]), int(s["end"]), (int(s["grid"][0]), int(s["grid"][1])), tuple(s.get("changes", ()))) for s in body["spans"]
    ]
    images = [_images.decode_png(base64.b64decode(item)) for item in body["images"]]
    if len(images) != len(spans):
        raise VqtokError(f"the server sent {len(images)} images for {len(spans)} spans")
    return DecodedSequence(to_output(images, output), spans)


def local_spans(layout: Layout, ids: list[int], grid: tuple[int, int] | None, repair: bool) -> list[Any]:
    """`layout.find_spans` here (a Layout given by the caller), its SequenceError as the server's 422 would be."""
    try:
        return layout.find_spans(np.asarray(ids, dtype=np.int64), grid=grid, repair=repair)
    except SequenceError as exc:
        body = {"type": INVALID_SEQUENCE, "status": 422, "detail": str(exc), "span": exc.span, "position": exc.position}
        raise InvalidSequenceError(422, "Unprocessable Content", str(exc), INVALID_SEQUENCE, body) from exc
    except ValueError as exc:  # InvalidInputError: plain without a grid, a grid over max_grid
        from .errors import ValidationError

        raise ValidationError(422, "Unprocessable Content", str(exc)) from exc


def span_info(span: Any) -> SpanInfo:
    """A core `ImageSpan` as the clients return it."""
    return SpanInfo(int(span.start), int(span.end), span.grid_hw, tuple(span.changes))


def caller_layout(layout: LayoutArg, vocab_offset: int, max_grid: int | None) -> Layout | None:
    """The caller's own Layout (None: a preset's name, built by the server or the backend); a Layout
    carries its offset and grid limit, so giving them again is an error."""
    if isinstance(layout, Layout):
        if vocab_offset or max_grid is not None:
            raise ValueError("a Layout carries its own vocab_offset and max_grid: give them to Layout(...), not here")
        return layout
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a preset name or a models.core.layouts.Layout, got {type(layout).__name__}")
    return None


def check_layout_model(layout: Layout, codebook_size: int, model: str) -> None:
    if layout.codebook_size != codebook_size:
        raise VqtokError(f"the layout is built for K = {layout.codebook_size} codes; model {model!r} has {codebook_size}")


def local_sequences(layout: Layout, grids: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A caller's Layout applied here to the grids the server (or the local runtime) gave."""
    from .errors import ValidationError

    try:
        return [layout.to_sequence(g) for g in grids]
    except ValueError as exc:
        raise ValidationError(422, "Unprocessable Content", str(exc)) from exc


def as_grid_list(tokens: np.ndarray | Sequence[Any]) -> tuple[bool, list[np.ndarray]]:
    """(was it a single grid, the grids as int32 (h, w) arrays)."""
    if isinstance(tokens, np.ndarray):
        if tokens.ndim == 2:
            return True, [tokens.astype(np.int32, copy=False)]
        if tokens.ndim == 3:
            return False, [t.astype(np.int32, copy=False) for t in tokens]
        raise VqtokError(f"token ids must be (h, w) or (B, h, w), got shape {tokens.shape}")
    grids = [np.asarray(t) for t in tokens]
    if grids and grids[0].ndim == 1:  # one grid given as nested lists
        return True, [np.asarray(tokens, dtype=np.int32)]
    for g in grids:
        if g.ndim != 2:
            raise VqtokError(f"each token grid must be (h, w), got shape {g.shape}")
        if not np.issubdtype(g.dtype, np.integer):
            raise VqtokError(f"token ids must be integers, got {g.dtype}")
    return False, [g.astype(np.int32, copy=False) for g in grids]


def decode_request(grids: np.ndarray, model: str | None, wire: Wire) -> RequestSpec:
    """A batch of same-shaped grids (B, h, w) -> a decode request answered with uint8 pixels."""
    params = {"model": model} if model else {}
    if wire == "npy":
        headers = {"Content-Type": NPY, "Accept": NPY}
        return RequestSpec(
            "POST", "/v1/decode", {"content": npy_bytes(np.ascontiguousarray(grids, dtype=np.int32)), "headers": headers, "params": params}
        )
    body: dict[str, Any] = {"tokens": grids.tolist()}
    if model:
        body["model"] = model
    return RequestSpec("POST", "/v1/decode", {"json": body, "headers": {"Accept": JSON}})


def parse_decode(response: httpx.Response, count: int) -> list[np.ndarray]:
    """A decode answer -> one uint8 (H, W, 3) image per grid, in request order."""
    raise_for_status(response)
    ctype = response.headers.get("content-type", "").split(";")[0].strip()
    if ctype == NPY:
        array = load_npy(response.content)
        if array.ndim != 4 or array.shape[0] != count:
            raise VqtokError(f"expected {count} images, the server sent an array of shape {array.shape}")
        return list(array.astype(np.uint8, copy=False))
    if ctype == "image/png":
        return [_images.decode_png(response.content)]
    body = response.json()
    encoded = body.get("images") or [r["image"] for r in body.get("results", [])]
    out = [_images.decode_png(base64.b64decode(item["png"] if isinstance(item, dict) else item)) for item in encoded]
    if len(out) != count:
        raise VqtokError(f"expected {count} images, the server sent {len(out)}")
    return out


def raise_for_status(response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise error_from_response(response)


def is_split_worthy(exc: APIStatusError, size: int) -> bool:
    """A 413 on a multi-image request: the server's limits are tighter than ours, send halves."""
    return exc.status == 413 and size > 1


def to_output(images: list[np.ndarray], output: Output) -> list[Any]:
    if output == "numpy":
        return list(images)
    if output == "pil":
        return [Image.fromarray(im) for im in images]
    raise ValueError(f"output must be 'pil' or 'numpy', got {output!r}")


def group_grids(grids: Sequence[np.ndarray], max_images: int) -> list[list[int]]:
    """Indices of grids batched by shape (the server decodes one grid shape per request), order-stable."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, g in enumerate(grids):
        by_shape.setdefault(g.shape, []).append(i)
    batches: list[list[int]] = []
    for idx in by_shape.values():
        batches.extend(idx[i : i + max_images] for i in range(0, len(idx), max_images))
    return batches


def auth_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": user_agent()}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def resolve(base_url: str | None, api_key: str | None) -> tuple[str, str | None]:
    return base_url or os.environ.get("VQTOK_BASE_URL") or DEFAULT_BASE_URL, api_key or os.environ.get("VQTOK_API_KEY") or None


def parse_models(response: httpx.Response) -> list[ModelCard]:
    body = response.json()
    items: list[dict[str, Any]] = (body.get("models") or body.get("data") or []) if isinstance(body, dict) else body
    return [ModelCard.from_json(m) for m in items]


def server_limits(response: httpx.Response) -> tuple[int, int] | None:
    """(images per request, body bytes) from a `GET /v1/models` answer, if it states them."""
    if response.status_code != 200:
        return None
    try:
        limits = response.json().get("limits") or {}
        return int(limits["max_images_per_request"]), int(limits["max_body_bytes"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def parse_default_model(response: httpx.Response) -> str:
    body = response.json()
    name = body.get("default_model") if isinstance(body, dict) else None
    if not name:
        cards = parse_models(response)
        if not cards:
            raise VqtokError("the server serves no model")
        name = cards[0].name
    return str(name)
