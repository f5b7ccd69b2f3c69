"""POST /v1/decode: token ids -> images. Ids are validated (integers in [0, K), a grid within the
limits) before any work is queued."""

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

from ..deps import State, require_api_key
from ..problems import BadRequest, NotAcceptable, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from ..repository import Served
from ..schemas import DecodeJSONRequest, DecodeResponse, ModelName
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
    to_npy,
    too_many_pixels,
    unless_disconnected,
    with_deadline,
)

router = APIRouter(prefix="/v1", tags=["decode"], dependencies=[Depends(require_api_key)])

_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/DecodeJSONRequest"}},
            NPY: {"schema": {"type": "string", "format": "binary", "description": "integer array (h, w) or (B, h, w)"}},
        },
    },
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": DecodeResponse,
        "content": {
            PNG: {"schema": {"type": "string", "format": "binary"}},
            NPY: {"schema": {"type": "string", "format": "binary", "description": "uint8 array (B, H, W, 3)"}},
        },
        "description": "JSON with base64 PNGs (default), one PNG (`Accept: image/png`, one grid) or uint8 (B, H, W, 3) npy",
    },
}


async def _read_tokens(request: Request, state: State) -> tuple[np.ndarray, str | None]:
    """(ids as a (B, h, w) array, model named in the body) from a JSON or npy body."""
    kind = media_type(request)
    body = await request.body()
    if kind == NPY:
        return _as_batch(await in_pool(state, from_npy, body)), None
    if kind == JSON:
        try:
            req = DecodeJSONRequest.model_validate_json(body)
        except ValidationError as exc:
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                raise BadRequest("body is not valid JSON") from None
            raise RequestValidationError(exc.errors()) from None
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


def _validate(ids: np.ndarray, state: State, served: Served) -> np.ndarray:
    s, k = state.settings, served.runtime.info.codebook_size
    b, h, w = ids.shape
    if b > s.max_images_per_request:
        raise PayloadTooLarge(f"{b} grids in one request; the limit is {s.max_images_per_request}")
    if h * w > s.max_grid_tokens:
        raise PayloadTooLarge(f"grid {h}×{w} has {h * w} tokens; the limit is {s.max_grid_tokens}")
    f = served.runtime.info.downsample
    problem = too_many_pixels(state, served, f"grid {h}×{w}", h * f, w * f)
    if problem is not None:
        raise problem
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
    base64 PNGs, one PNG with `Accept: image/png` (a single grid), or a uint8 (B, H, W, 3) npy array."""
    answer = negotiate(request.headers.get("accept"), [JSON, PNG, NPY])
    if answer is None:
        raise NotAcceptable("decode answers application/json, image/png or application/x-npy")

    async def work(deadline: float) -> Response:
        raw, body_model = await _read_tokens(request, state)
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
