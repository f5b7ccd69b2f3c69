"""RFC 7807 `application/problem+json` for every error the service answers, one body shape for all.

Every error a request can end in is a `models.core.errors.Problem`, whose class carries its status, its
problem type and whether to add `Retry-After`; the core's own (invalid input, unknown model, queue full,
deadline, …) and the few only HTTP has (below: authentication, media types, body limits) are answered by
the one handler installed here. FastAPI's validation errors, Starlette's 404/405 and anything unexpected
are mapped to the same body.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.core.errors import Problem

from .logs import request_id_var

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("vqtok.service")


class BadRequest(Problem):
    status, slug = 400, "bad-request"


class Unauthorized(Problem):
    status, slug = 401, "unauthorized"
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class Forbidden(Problem):
    status, slug = 403, "forbidden"


class NotAcceptable(Problem):
    status, slug = 406, "not-acceptable"


class PayloadTooLarge(Problem):
    status, slug = 413, "too-large"


class UnsupportedMediaType(Problem):
    status, slug = 415, "unsupported-media-type"


class Unprocessable(Problem):
    status, slug = 422, "invalid-input"


class NotReady(Problem):
    status, slug, retry = 503, "not-ready", True


class ClientClosed(Problem):
    status, slug = 499, "client-closed-request"


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return {499: "Client Closed Request"}.get(status, "Error")


def problem_response(
    status: int, detail: str, *, slug: str, instance: str = "", headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"urn:vqtok:problem:{slug}",
        "title": _title(status),
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    rid = request_id_var.get()
    if rid:
        body["request_id"] = rid
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=dict(headers or {}))


def _jsonable_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors without the offending input (it may be bytes, or huge) or exception objects."""
    out = []
    for e in errors:
        out.append({"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))})
    return out[:20]


def problem_headers(exc: Problem, retry_after_s: float) -> dict[str, str]:
    headers = dict(getattr(exc, "headers", {}))
    if exc.retry:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s if exc.retry_after_s is not None else retry_after_s)))
    return headers


def install(app: FastAPI, retry_after_s: float) -> None:
    """The handlers; `retry_after_s`: the `Retry-After` of a retryable problem that does not know its own."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        headers = problem_headers(exc, retry_after_s)
        return problem_response(exc.status, exc.detail, slug=exc.slug, instance=request.url.path, headers=headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _jsonable_errors(exc.errors())
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:3]) or "invalid request"
        return problem_response(422, detail, slug="invalid-request", instance=request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        detail = exc.detail if isinstance(exc.detail, str) else _title(exc.status_code)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}"
        return problem_response(exc.status_code, detail, slug=slug, instance=request.url.path, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "internal error; see the server log with this request_id", slug="internal", instance=request.url.path)
