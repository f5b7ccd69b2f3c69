"""Typed client errors, mapped from the service's RFC 7807 `application/problem+json` bodies.

Every error the client raises derives from `VqtokError`, so `except VqtokError` catches all of them;
HTTP answers derive from `APIStatusError` and carry `status`, `title`, `detail` and `type`.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class VqtokError(Exception):
    """Base of everything the vqtok client raises."""


class APIConnectionError(VqtokError):
    """The server could not be reached (refused, reset, DNS), after the allowed retries."""


class APITimeoutError(APIConnectionError):
    """The client's own timeout expired before the server answered."""


class APIStatusError(VqtokError):
    """The server answered with an error status; fields come from its problem+json body."""

    status: int

    def __init__(self, status: int, title: str, detail: str = "", type: str = "about:blank", body: Any = None) -> None:
        super().__init__(f"{status} {title}" + (f": {detail}" if detail else ""))
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.body = body


class BadRequestError(APIStatusError):
    """400: an image the server cannot decode, or a malformed request."""


class AuthenticationError(APIStatusError):
    """401/403: missing or wrong API key."""


class NotFoundError(APIStatusError):
    """404: unknown model (or route)."""


class PayloadTooLargeError(APIStatusError):
    """413: body size, image count or pixel count over the server's limits."""


class NotAcceptableError(APIStatusError):
    """406: the asked-for answer type cannot hold the answer (several grid sizes in one npy, several images
    in one PNG): ask for JSON (`wire="json"`), or make the images one size (`resize="crop"`)."""


class UnsupportedMediaTypeError(APIStatusError):
    """415: a content type the server does not accept."""


class ValidationError(APIStatusError):
    """422: invalid token ids, shapes or parameters."""


UnprocessableEntityError = ValidationError


class InvalidSequenceError(ValidationError):
    """422 `invalid-sequence`: a malformed image span in an LLM's sequence; `span` (its index) and
    `position` (in the sequence) say where, as the problem body does."""

    @property
    def span(self) -> int | None:
        return _int_member(self.body, "span")

    @property
    def position(self) -> int | None:
        return _int_member(self.body, "position")


def _int_member(body: Any, name: str) -> int | None:
    value = body.get(name) if isinstance(body, dict) else None
    return value if isinstance(value, int) else None


INVALID_SEQUENCE = "urn:vqtok:problem:invalid-sequence"


class RateLimitError(APIStatusError):
    """429: too many requests."""


class OverloadedError(APIStatusError):
    """503: the server's queue is full (it sends Retry-After) or a model is not ready."""


class RequestTimeoutError(APIStatusError):
    """408/504: the request outlived its deadline on the server."""


class ServerError(APIStatusError):
    """500 and other 5xx answers."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    406: NotAcceptableError,
    408: RequestTimeoutError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: ValidationError,
    429: RateLimitError,
    503: OverloadedError,
    504: RequestTimeoutError,
}


def error_class(status: int) -> type[APIStatusError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else APIStatusError


def error_from_response(response: httpx.Response) -> APIStatusError:
    """Build the typed error for an error response whose body has been read."""
    status = response.status_code
    title, detail, type_, body = response.reason_phrase or "error", "", "about:blank", None
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        body = response.text[:500] if response.content else None
        detail = body or ""
    if isinstance(body, dict):
        title = str(body.get("title") or title)
        detail = str(body.get("detail") or "")
        type_ = str(body.get("type") or type_)
    cls = InvalidSequenceError if status == 422 and type_ == INVALID_SEQUENCE else error_class(status)
    return cls(status, title, detail, type_, body)
