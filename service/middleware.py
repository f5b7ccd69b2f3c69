"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer bodies and break disconnect detection).

- `RequestContext`: request id (`X-Request-ID` taken if sane, else made, and echoed), the access log
  line, request counters and latency by route template.
- `BodyLimit`: a declared `Content-Length` over the limit is answered 413 before reading anything;
  a streamed body is counted while it arrives and reading stops with 413 the moment it passes the limit.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .logs import request_id_var
from .metrics import Metrics
from .problems import PayloadTooLarge, problem_response

log = logging.getLogger("vqtok.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class _RequestIds:
    """32 hex digits like `uuid4().hex`, without a syscall per request: a random 64-bit prefix per
    process (drawn again in a forked child) and a counter."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix, self.counter = os.urandom(8).hex(), itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_request_id = _RequestIds()


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _SANE_ID.match(incoming) else new_request_id()
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500
        sent = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(elapsed)
            extra: dict[str, Any] = {
                "method": method,
                "path": scope["path"],
                "status": status,
                "ms": round(elapsed * 1000, 2),
                "bytes_out": sent,
                "client": (scope.get("client") or ("", 0))[0],
            }
            log.info("%s %s %d", method, scope["path"], status, extra=extra)
            request_id_var.reset(token)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length > self.max_bytes:
                response = problem_response(
                    413, f"body of {length} bytes is over the limit of {self.max_bytes}", slug="too-large", instance=scope["path"]
                )
                await response(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(f"body is over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)
