"""POST /v1/decode: token ids -> images. Ids are validated (integers in [0, K), a grid within the
limits) before any work is queued. A JSON body with `sequence` (an LLM's output) and `layout` has its
image spans found, checked and decoded (issue 27)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from models.core import pixels as images
from models.core.layouts import ImageSpan, Layout, describe

from ..deps import State, require_api_key
from ..problems import BadRequest, NotAcceptable, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from ..repository import Served
from ..schemas import DecodeJSONRequest, DecodeResponse, DecodeSequenceRequest, ModelName
from .common import (
    JSON,
    NPY,
    PNG,
    from_npy,
    in_pool,
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
from .layouts import layout_for

router = APIRouter(prefix="/v1", tags=["decode"], dependencies=[Depends(require_api_key)])

_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/DecodeJSONRequest"},
                        {"$ref": "#/components/schemas/DecodeSequenceRequest"},
                    ]
                }
            },
            NPY: {"schema": {"type": "string", "format": "binary", "description": "integer array (h, w) or (B, h, w)"}},
        },
    },
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": DecodeResponse,
        "content": {
            JSON: {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/DecodeResponse"},
                        {"$ref": "#/components/schemas/DecodeSequenceResponse"},
                    ]
                }
            },
            PNG: {"schema": {"type": "string", "format": "binary"}},
            NPY: {"schema": {"type": "string", "format": "binary", "description": "uint8 array (B, H, W, 3)"}},
        },
        "description": "JSON with base64 PNGs (default; for a `sequence`, with its spans: DecodeSequenceResponse), one PNG "
        "(`Accept: image/png`, one grid or one span) or uint8 (B, H, W, 3) npy (every grid the same size)",
    },
}


def _is_sequence_body(body: bytes) -> bool:
    """A JSON object with a `sequence` member (checked cheaply first: token bodies are large)."""
    if b'"sequence"' not in body:
        return False
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and "sequence" in parsed


def _validated(schema: Any, body: bytes) -> Any:
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise BadRequest("body is not valid JSON") from None
        raise RequestValidationError(exc.errors()) from None


async def _read_tokens(request: Request, state: State) -> tuple[np.ndarray | DecodeSequenceRequest, str | None]:
    """(ids as a (B, h, w) array, or a sequence request; the model named in the body) from a JSON or npy body."""
    kind = media_type(request)
    body = await request.body()
    if kind == NPY:
        return _as_batch(await in_pool(state, from_npy, body)), None
    if kind == JSON:
        if _is_sequence_body(body):
            seq: DecodeSequenceRequest = _validated(DecodeSequenceRequest, body)
            return seq, seq.model
        req: DecodeJSONRequest = _validated(DecodeJSONRequest, body)
        batch = _as_batch(_ids_from_json(req.tokens))
        if req.grid is not None and list(batch.shape[1:]) != req.grid:
            raise Unprocessable(f"tokens have grid {list(batch.shape[1:])} but grid says {req.grid}")
        return batch, req.model
    raise UnsupportedMediaType(f"content type {kind or '(none)'!r}: send application/json or application/x-npy")


def _ids_from_json(tokens: list[Any]) -> np.ndarray:
    try:
        ids = np.array(tokens)
    except (ValueError, OverflowError):
        ids = None
    if ids is None or ids.dtype == object:
        raise Unprocessable("tokens must be a rectangular h×w grid (or B same-size grids) of integer ids")
    if ids.dtype.kind not in "iu":  # floats, bools, strings
        raise Unprocessable(f"token ids must be integers; got {ids.dtype.name} values")
    return ids


def _as_batch(ids: np.ndarray) -> np.ndarray:
    if ids.dtype.kind not in "iu":
        raise Unprocessable(f"token ids must be integers, not {ids.dtype}")
    if ids.ndim == 2:
        ids = ids[None]
    if ids.ndim != 3 or 0 in ids.shape:
        raise Unprocessable(f"tokens must have shape (h, w) or (B, h, w) with every size ≥ 1, not {tuple(ids.shape)}")
    return ids


def _check_grid(state: State, served: Served, h: int, w: int, what: str = "") -> None:
    s = state.settings
    if h * w > s.max_grid_tokens:
        raise PayloadTooLarge(f"{what}grid {h}×{w} has {h * w} tokens; the limit is {s.max_grid_tokens}")
    f = served.runtime.info.downsample
    problem = too_many_pixels(state, served, f"{what}grid {h}×{w} decodes to", h * f, w * f)
    if problem is not None:
        raise problem


def _validate(ids: np.ndarray, state: State, served: Served) -> np.ndarray:
    s, k = state.settings, served.runtime.info.codebook_size
    b, h, w = ids.shape
    if b > s.max_images_per_request:
        raise PayloadTooLarge(f"{b} grids in one request; the limit is {s.max_images_per_request}")
    _check_grid(state, served, h, w)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= k:
        bad = lo if lo < 0 else hi
        raise Unprocessable(f"token id {bad} is outside [0, {k}) for model {served.name!r}")
    return ids.astype(np.int32, copy=False)


@router.post(
    "/decode",
    summary="Token ids to images",
    response_model=DecodeResponse,
    responses=_RESPONSES,  # type: ignore[arg-type]
    openapi_extra=_OPENAPI,
)
async def decode(
    request: Request,
    state: State,
    model: ModelName | None = Query(None, description="model name (JSON `model` takes precedence)"),
) -> Response:
    """JSON `{"tokens": [[...]]}` (one grid or a batch) or an npy integer array body. Answers JSON with
    base64 PNGs, one PNG with `Accept: image/png` (a single grid), or a uint8 (B, H, W, 3) npy array.

    JSON `{"sequence": [...], "layout": "lumina", "vocab_offset": N, "repair": false}`: an LLM's output,
    text around any number of image spans. Every span is found and checked (a malformed one is a 422
    `invalid-sequence` problem whose `span` and `position` say where; `repair: true` mends it and the
    answer's `spans[].changes` say how) and decoded: JSON with one base64 PNG and its span per image, one
    PNG with `Accept: image/png` when there is exactly one span, or npy when every span has one grid size."""
    answer = negotiate(request.headers.get("accept"), [JSON, PNG, NPY])
    if answer is None:
        raise NotAcceptable("decode answers application/json, image/png or application/x-npy")

    async def work(deadline: float) -> Response:
        raw, body_model = await _read_tokens(request, state)
        if isinstance(raw, DecodeSequenceRequest):
            return await _decode_sequence(request, state, raw, body_model or model, answer, deadline)
        if answer == PNG and raw.shape[0] != 1:
            raise NotAcceptable(f"image/png holds one image; this request has {raw.shape[0]} grids (ask for JSON or npy)")
        async with leased(state, body_model or model, request) as served:
            ids = _validate(raw, state, served)
            pixels = await unless_disconnected(request, infer(served, "decode", ids, deadline))
            state.metrics.images.labels(served.name, "decode").inc(len(pixels))
            state.metrics.tokens.labels(served.name, "decode").inc(ids.size)
            headers = {"X-Model": served.name}
            if answer == NPY:
                return Response(await in_pool(state, to_npy, pixels), media_type=NPY, headers=headers)
            pngs = await asyncio.gather(*(in_pool(state, images.encode_png, p) for p in pixels))
            if answer == PNG:
                return Response(pngs[0], media_type=PNG, headers=headers)
            body = {
                "model": served.name,
                "grid": list(ids.shape[1:]),
                "size": list(pixels.shape[1:3]),
                "images": [base64.b64encode(p).decode("ascii") for p in pngs],
            }
            return Response(json.dumps(body).encode(), media_type=JSON, headers=headers)

    return await with_deadline(request, state, work)


def _find_spans(layout: Layout, req: DecodeSequenceRequest) -> list[ImageSpan]:
    grid = (req.grid[0], req.grid[1]) if req.grid is not None else None
    try:
        ids = np.asarray(req.sequence, dtype=np.int64)
    except OverflowError:
        raise Unprocessable("sequence ids must fit in 64-bit integers") from None
    return layout.find_spans(ids, grid=grid, repair=req.repair)


async def _decode_sequence(
    request: Request, state: State, req: DecodeSequenceRequest, model: str | None, answer: str, deadline: float
) -> Response:
    """Find, check and decode every image span of an LLM's sequence (see `decode`)."""
    async with leased(state, model, request) as served:
        layout = layout_for(state, served, req.layout, req.vocab_offset, req.max_grid)
        spans = await small_inline(state, len(req.sequence), lambda: _find_spans(layout, req))
        if len(spans) > state.settings.max_images_per_request:
            raise PayloadTooLarge(f"{len(spans)} image spans in one sequence; the limit is {state.settings.max_images_per_request}")
        for i, span in enumerate(spans):
            _check_grid(state, served, *span.grid_hw, what=f"span {i} (position {span.start}): ")
        shapes = {span.grid_hw for span in spans}
        if answer == PNG and len(spans) != 1:
            raise NotAcceptable(f"image/png holds one image; this sequence has {len(spans)} image spans (ask for JSON)")
        if answer == NPY and len(shapes) != 1:
            what = "no image span" if not spans else f"spans of {len(shapes)} grid sizes"
            raise NotAcceptable(f"one npy array holds images of one size; this sequence has {what} (ask for JSON)")
        pixels = await unless_disconnected(request, _decode_grouped(served, [span.grid for span in spans], deadline))
        state.metrics.images.labels(served.name, "decode").inc(len(pixels))
        state.metrics.tokens.labels(served.name, "decode").inc(sum(span.grid.size for span in spans))
        headers = {"X-Model": served.name, "X-Layout": layout.name, "X-Spans": str(len(spans))}
        repaired = any(span.changes for span in spans)
        if repaired:
            headers["X-Repaired"] = "true"
        if answer == NPY:
            return Response(await in_pool(state, to_npy, np.stack(pixels)), media_type=NPY, headers=headers)
        pngs = await asyncio.gather(*(in_pool(state, images.encode_png, p) for p in pixels))
        if answer == PNG:
            return Response(pngs[0], media_type=PNG, headers=headers)
        body = {
            "model": served.name,
            "layout": describe(layout),
            "repaired": repaired,
            "spans": [
                {"start": s.start, "end": s.end, "grid": list(s.grid_hw), "size": list(p.shape[:2]), "changes": list(s.changes)}
                for s, p in zip(spans, pixels, strict=True)
            ],
            "images": [base64.b64encode(p).decode("ascii") for p in pngs],
        }
        return Response(json.dumps(body).encode(), media_type=JSON, headers=headers)


async def _decode_grouped(served: Served, grids: list[np.ndarray], deadline: float) -> list[np.ndarray]:
    """Same-size grids go to the batcher together; images come back in span order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, g in enumerate(grids):
        groups.setdefault(g.shape, []).append(i)
    out: list[np.ndarray | None] = [None] * len(grids)

    async def one(indices: list[int]) -> None:
        batch = np.stack([grids[i] for i in indices]).astype(np.int32)
        result = await infer(served, "decode", batch, deadline)
        for j, i in enumerate(indices):
            out[i] = result[j]

    await asyncio.gather(*(one(ix) for ix in groups.values()))
    return [p for p in out if p is not None]
