"""What the encode and decode routes share: content negotiation, npy bodies, the per-request
deadline, dropping work whose client went away, the model lease and the batcher call."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np
from fastapi import Request

from models.core.errors import DeadlineExceeded

from ..deps import ServiceState
from ..problems import ClientClosed, PayloadTooLarge, Unprocessable
from ..repository import Served

T = TypeVar("T")
NPY = "application/x-npy"
JSON = "application/json"
PNG = "image/png"


def negotiate(accept: str | None, offers: list[str]) -> str | None:
    """The offer the Accept header prefers (q-values honoured); offers[0] when there is no header."""
    if not accept:
        return offers[0]
    best: tuple[float, int, str] | None = None
    for pos, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        mtype, q = fields[0].lower(), 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        if mtype in ("*/*", ""):
            match = offers[0]
        elif mtype.endswith("/*"):
            match = next((o for o in offers if o.startswith(mtype[:-1])), "")
        else:
            match = mtype if mtype in offers else ""
        if match and (best is None or (q, -pos) > (best[0], -best[1])):
            best = (q, pos, match)
    return best[2] if best else None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def to_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def from_npy(body: bytes) -> np.ndarray:
    from ..problems import BadRequest

    try:
        return np.load(io.BytesIO(body), allow_pickle=False)  # type: ignore[no-any-return]
    except Exception as exc:  # ValueError (pickled/object arrays, bad header), EOFError, OSError
        raise BadRequest(f"body is not a readable .npy array: {exc}") from exc


def deadline_seconds(request: Request, state: ServiceState) -> float:
    """The server's request timeout, shortened (never lengthened) by an `X-Request-Timeout` header."""
    limit = state.settings.request_timeout_s
    asked = request.headers.get("x-request-timeout")
    if asked:
        try:
            value = float(asked)
        except ValueError:
            raise Unprocessable("X-Request-Timeout must be a number of seconds") from None
        if not value > 0:
            raise Unprocessable("X-Request-Timeout must be positive")
        limit = min(limit, value)
    return limit


async def with_deadline(request: Request, state: ServiceState, work: Callable[[float], Awaitable[T]]) -> T:
    """Run `work(deadline)` under the request's deadline (monotonic seconds); past it: 504."""
    timeout = deadline_seconds(request, state)
    try:
        return await asyncio.wait_for(work(time.monotonic() + timeout), timeout)
    except asyncio.TimeoutError:
        # Label with the model that was leased (a bounded set), never with a client-supplied string.
        model = getattr(request.state, "served_model", None) or "-"
        state.metrics.rejected.labels(model, "deadline").inc()
        raise DeadlineExceeded(f"request outlived its deadline of {timeout:g} s") from None


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which takes its items out of the batcher queue) if the client
    disconnects first. Call only after the request body has been read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientClosed("client disconnected; its work was dropped")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def infer(served: Served, op: str, batch: np.ndarray, deadline: float) -> np.ndarray:
    """Submit one same-shape batch to the model's batcher (what it refuses or fails with is a Problem)."""
    return await served.batcher.submit(op, batch, deadline)


@asynccontextmanager
async def leased(state: ServiceState, model: str | None, request: Request | None = None) -> AsyncIterator[Served]:
    """The served model; with `request`, its resolved name is kept on `request.state.served_model`
    (for metric labels, which must not take client-supplied strings)."""
    async with state.repo.lease(model) as served:
        if request is not None:
            request.state.served_model = served.name
        yield served


def too_many_pixels(state: ServiceState, served: Served, what: str, h: int, w: int) -> PayloadTooLarge | None:
    """The 413 for one image (`what`: "images[2] is", "grid 64×64 decodes to") whose h×w pixels at the
    model's input exceed what one inference call may hold, so that it could never run; None when it fits."""
    budget = served.batcher.max_batch_pixels
    if budget is None or h * w <= budget:
        return None
    s = state.settings
    source = "" if s.max_batch_pixels is not None else f", from memory_budget_gib={s.memory_budget_gib:g}"
    return PayloadTooLarge(
        f"{what} {w}×{h} = {h * w} pixels at the model's input; one inference call holds at most "
        f"{budget} pixels (max_batch_pixels{source}), so it can never run: send a smaller one"
    )


def in_pool(state: ServiceState, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
    return asyncio.get_running_loop().run_in_executor(state.pool, fn, *args)


INLINE_ELEMENTS = 1 << 16  # below this, serialising on the loop is cheaper than a thread hop


async def small_inline(state: ServiceState, elements: int, fn: Callable[[], T]) -> T:
    """`fn()` on the event loop when the data is small (a token grid), in the pool when it is not."""
    return fn() if elements <= INLINE_ELEMENTS else await in_pool(state, fn)
