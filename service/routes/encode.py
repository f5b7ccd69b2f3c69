"""POST /v1/encode: images -> token ids."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import ValidationError

from models.core import pixels as images
from models.core.layouts import LAYOUTS, Layout, describe

from .. import forms
from ..deps import State, require_api_key
from ..problems import BadRequest, NotAcceptable, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from ..repository import Served
from ..schemas import MAX_ID, EncodeJSONRequest, EncodeResponse, LayoutName, MaxGrid, ModelName, VocabOffset
from ..settings import ResizeMode
from .common import (
    JSON,
    NPY,
    infer,
    leased,
    media_type,
    negotiate,
    small_inline,
    to_npy,
    too_many_pixels,
    unless_disconnected,
    with_deadline,
)
from .layouts import form_int, layout_for

router = APIRouter(prefix="/v1", tags=["encode"], dependencies=[Depends(require_api_key)])

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "one part per image file"},
        "model": {"type": "string"},
        "resize": {
            "type": "string",
            "enum": ["crop", "pad", "none"],
            "description": "default: the server's default_resize (crop unless configured otherwise; GET /v1/models says)",
        },
        "layout": {"type": "string", "enum": list(LAYOUTS), "description": "LLM layout: each image also gets its `sequence`"},
        "vocab_offset": {"type": "integer", "minimum": 0, "maximum": MAX_ID, "description": "LLM id of image code 0 (default 0)"},
        "max_grid": {"type": "integer", "minimum": 1, "description": "largest grid side of the layout (default: the server's)"},
    },
}
_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {"schema": {"$ref": "#/components/schemas/EncodeJSONRequest"}},
        },
    },
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": EncodeResponse,
        "content": {
            NPY: {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "int32 array (B, h, w); with `layout`, the sequences: int32 (B, L)",
                }
            }
        },
        "description": "tokens per image (JSON; with `layout` also each image's `sequence` and the `layout` once), or one int32 "
        "array with `Accept: application/x-npy`: (B, h, w) token grids, or with `layout` (B, L) sequences",
    },
}


@dataclass(frozen=True)
class Fields:
    """What an encode body names besides its images (None: not given, the query or the default applies)."""

    model: str | None = None
    resize: str | None = None
    layout: str | None = None
    vocab_offset: int | None = None
    max_grid: int | None = None


def _form_fields(form: forms.Form) -> Fields:
    layout = form.field("layout") or None
    if layout is not None and layout not in LAYOUTS:
        raise Unprocessable(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    offset = form_int(form.field("vocab_offset"), "vocab_offset")
    if offset is not None and not 0 <= offset <= MAX_ID:
        raise Unprocessable(f"vocab_offset must be between 0 and {MAX_ID}, not {offset}")
    side = form_int(form.field("max_grid"), "max_grid")
    if side is not None and side < 1:
        raise Unprocessable(f"max_grid must be at least 1, not {side}")
    return Fields(form.field("model"), form.field("resize"), layout, offset, side)


async def _read_request(request: Request, state: State) -> tuple[list[bytes], Fields]:
    """(image files, the other fields) from a multipart or JSON body."""
    limit = state.settings.max_images_per_request
    kind = media_type(request)
    if kind == "multipart/form-data":
        try:
            parser = forms.FormParser(request.headers["content-type"], max_files=limit, max_fields=16)
            async for chunk in request.stream():  # parsed as it arrives: no second copy of the body
                parser.write(chunk)
            form = parser.finish()
        except forms.TooManyFiles:
            raise PayloadTooLarge(f"more than {limit} images in one request") from None
        except forms.FormError as exc:
            raise BadRequest(f"cannot parse the multipart body: {exc}") from None
        parts = form.files("images")
        if any(p.filename is None for p in parts):
            raise Unprocessable("'images' parts must be files (filename=...)")
        return [p.data for p in parts], _form_fields(form)
    if kind == JSON:
        body = await request.body()
        try:
            req = EncodeJSONRequest.model_validate_json(body)
        except ValidationError as exc:
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                raise BadRequest("body is not valid JSON") from None
            from fastapi.exceptions import RequestValidationError

            raise RequestValidationError(exc.errors()) from None
        if len(req.images) > limit:
            raise PayloadTooLarge(f"{len(req.images)} images in one request; the limit is {limit}")
        fields = Fields(req.model, req.resize, req.layout, req.vocab_offset, req.max_grid)
        return [_b64(s, i) for i, s in enumerate(req.images)], fields
    raise UnsupportedMediaType(f"content type {kind or '(none)'!r}: send multipart/form-data or application/json")


def _b64(text: str, index: int) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"images[{index}] is not valid base64") from None


def _prepare_all(state: State, served: Served, files: list[bytes], resize: ResizeMode) -> list[asyncio.Future[images.PreparedImage]]:
    """One future per image: small images prepared here on the event loop, up to `inline_decode_pixels`
    in total by their headers (no thread hop: a small image decodes in less time than handing it to a thread costs),
    the others in the decode threads. A header that cannot be read goes to the threads, whose
    `prepare` reports it in its own words."""
    s, info = state.settings, served.runtime.info
    loop = asyncio.get_running_loop()

    def prepare(data: bytes, header: images.Header | None = None) -> images.PreparedImage:
        return images.prepare(
            data,
            downsample=info.downsample,
            resolution=info.resolution,
            resize=resize,
            max_pixels=s.max_image_pixels,
            max_grid_tokens=s.max_grid_tokens,
            header=header,
        )

    budget = s.inline_decode_pixels
    futures: list[asyncio.Future[images.PreparedImage]] = []
    for data in files:
        header = _header(data, budget) if budget > 0 else None  # None: larger than what is left, or unreadable
        if header is None:
            futures.append(loop.run_in_executor(state.pool, prepare, data))
            continue
        budget -= header.size[0] * header.size[1]
        future = loop.create_future()
        try:
            future.set_result(prepare(data, header))
        except Exception as exc:  # the same errors the threads' futures carry
            future.set_exception(exc)
        futures.append(future)
    return futures


def _header(data: bytes, max_pixels: int) -> images.Header | None:
    try:
        return images.read_header(data, max_pixels=max_pixels)
    except (images.ImageError, images.ImageTooLarge):
        return None  # decoding reports it, in its own words


def _probe(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    header = _header(data, max_pixels)
    return None if header is None else header.size


async def _check_pixel_budget(state: State, served: Served, files: list[bytes], resize: ResizeMode) -> None:
    """413 for an image no inference call may hold (its size at the model's input above the model's
    max_batch_pixels), from the headers, before any image is decoded."""
    budget = served.batcher.max_batch_pixels
    s, info = state.settings, served.runtime.info
    f = info.downsample
    largest = info.resolution**2 if resize == "crop" else s.max_grid_tokens * f * f  # what the per-image limits let through
    if budget is None or largest <= budget:
        return
    loop = asyncio.get_running_loop()
    sizes = await asyncio.gather(*(loop.run_in_executor(state.pool, _probe, data, s.max_image_pixels) for data in files))
    for i, size in enumerate(sizes):
        if size is None:
            continue
        h, w = (info.resolution, info.resolution) if resize == "crop" else size
        if resize == "pad":
            h, w = -(-h // f) * f, -(-w // f) * f
        problem = too_many_pixels(state, served, f"images[{i}] is", h, w)
        if problem is not None:
            raise problem


async def _prepare(state: State, served: Served, files: list[bytes], resize: ResizeMode) -> list[images.PreparedImage]:
    results = await asyncio.gather(*_prepare_all(state, served, files, resize), return_exceptions=True)
    out = []
    for i, r in enumerate(results):
        if isinstance(r, (images.ImageTooLarge, images.ImageShapeError, images.ImageError)):
            raise type(r)(f"images[{i}]: {r}")  # the same problem, naming the image
        if isinstance(r, BaseException):
            raise r
        out.append(r)
    return out


@router.post(
    "/encode",
    summary="Images to token ids",
    response_model=EncodeResponse,
    responses=_RESPONSES,  # type: ignore[arg-type]
    openapi_extra=_OPENAPI,
)
async def encode(
    request: Request,
    state: State,
    model: ModelName | None = Query(None, description="model name (a form field or JSON `model` takes precedence)"),
    resize: ResizeMode | None = Query(
        None,
        description="crop | pad | none; default: the server's default_resize, crop unless configured otherwise "
        "(a form field or JSON `resize` takes precedence)",
    ),
    layout: LayoutName | None = Query(
        None, description="LLM layout for `sequence` answers (a form field or JSON `layout` takes precedence)"
    ),
    vocab_offset: VocabOffset | None = Query(
        None, description="LLM id of image code 0 (a form field or JSON `vocab_offset` takes precedence)"
    ),
    max_grid: MaxGrid | None = Query(None, description="largest grid side of the layout (default: the server's)"),
) -> Response:
    """Multipart `images` file parts, or JSON `{"images": [base64, ...]}`. Per image the answer gives
    `tokens` (h rows of w ids) and `grid` [h, w]; with `Accept: application/x-npy` one int32 (B, h, w)
    array instead (all images must then give the same grid), with `X-Model` and `X-Codebook-Size` headers.
    With `layout` (and `vocab_offset`), each image also gets its `sequence` of LLM ids and the answer
    names the layout's ids once (`layout`); the npy answer is then the int32 (B, L) sequences."""
    answer = negotiate(request.headers.get("accept"), [JSON, NPY])
    if answer is None:
        raise NotAcceptable("encode answers application/json or application/x-npy")

    async def work(deadline: float) -> Response:
        files, body = await _read_request(request, state)
        if not files:
            raise Unprocessable("no images: send one or more 'images' parts (or JSON images)")
        mode = body.resize or resize or state.settings.default_resize
        if mode not in ("none", "crop", "pad"):
            raise Unprocessable(f"resize must be crop, pad or none, not {mode!r}")
        layout_name = body.layout or layout
        async with leased(state, body.model or model, request) as served:
            chosen = None
            if layout_name is not None:
                offset = body.vocab_offset if body.vocab_offset is not None else vocab_offset
                chosen = layout_for(state, served, layout_name, offset, body.max_grid if body.max_grid is not None else max_grid)
            await _check_pixel_budget(state, served, files, mode)  # type: ignore[arg-type]
            prepared = await _prepare(state, served, files, mode)  # type: ignore[arg-type]
            _check_answerable(prepared, served.runtime.info.downsample, chosen, answer)  # before the model's time is spent
            tokens = await unless_disconnected(request, _encode_grouped(state, served, [p.pixels for p in prepared], deadline))
            info = served.runtime.info
            state.metrics.images.labels(served.name, "encode").inc(len(tokens))
            state.metrics.tokens.labels(served.name, "encode").inc(sum(t.size for t in tokens))
            headers = {"X-Model": served.name, "X-Codebook-Size": str(info.codebook_size)}
            if chosen is not None:
                headers |= {"X-Layout": chosen.name, "X-Vocab-Offset": str(chosen.vocab_offset)}
            if answer == NPY:
                if chosen is None:
                    npy = await small_inline(state, sum(t.size for t in tokens), lambda: to_npy(np.stack(tokens)))
                else:
                    layout_ = chosen
                    npy = await small_inline(
                        state, sum(t.size for t in tokens), lambda: to_npy(layout_.to_sequences(np.stack(tokens)).astype(np.int32))
                    )
                return Response(npy, media_type=NPY, headers=headers)
            return Response(
                await small_inline(state, 8 * sum(t.size for t in tokens), lambda: _json_answer(served, tokens, prepared, chosen)),
                media_type=JSON,
                headers=headers,
            )

    return await with_deadline(request, state, work)


def _check_answerable(prepared: list[images.PreparedImage], f: int, layout: Layout | None, answer: str) -> None:
    """What the answer could not hold is refused before encoding: grids past the layout's max_grid (422),
    several grid sizes in one npy array (406, as decode answers the same case)."""
    grids = {(p.pixels.shape[0] // f, p.pixels.shape[1] // f) for p in prepared}
    if layout is not None:
        for h, w in grids:
            layout.check_grid_hw(h, w)
    if answer == NPY and len(grids) > 1:
        raise NotAcceptable("images give different grids, which one npy array cannot hold; ask for JSON or use resize=crop")


def _json_answer(served: Served, tokens: list[np.ndarray], prepared: list[images.PreparedImage], layout: Layout | None) -> bytes:
    info = served.runtime.info
    items: list[dict[str, Any]] = [
        {"tokens": t.tolist(), "grid": list(t.shape), "source_size": list(p.source_size)} for t, p in zip(tokens, prepared, strict=True)
    ]
    body: dict[str, Any] = {"model": served.name, "codebook_size": info.codebook_size, "downsample": info.downsample}
    if layout is not None:
        body["layout"] = describe(layout)
        for item, t in zip(items, tokens, strict=True):
            item["sequence"] = layout.to_sequence(t).tolist()
    body["images"] = items
    return json.dumps(body, separators=(",", ":")).encode()


async def _encode_grouped(state: State, served: Served, pixels: list[np.ndarray], deadline: float) -> list[np.ndarray]:
    """Same-size images go to the batcher together; results come back in request order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(pixels):
        groups.setdefault(p.shape, []).append(i)
    out: list[np.ndarray | None] = [None] * len(pixels)

    async def one(indices: list[int]) -> None:
        batch = np.stack([pixels[i] for i in indices])
        result = await infer(served, "encode", batch, deadline)
        for j, i in enumerate(indices):
            out[i] = result[j]

    await asyncio.gather(*(one(ix) for ix in groups.values()))
    return [t for t in out if t is not None]
