"""Retries as an httpx transport wrapper, one policy for the sync and the async client.

Every vqtok route is idempotent (encode and decode are pure functions of their input), so any
request may be sent again. Only transient failures are retried: 408, 429, 503, 504 and connection
errors; the wait is capped exponential backoff with jitter, or the server's `Retry-After`.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

RETRY_STATUSES = frozenset({408, 429, 503, 504})
# Failures where the request cannot have produced an answer worth keeping. A client-side ReadTimeout
# is not among them: the server may still be working on it, so sending it again adds load.
RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)
NO_RETRY = "vqtok_no_retry"  # request extension: send this request once (e.g. readiness probes)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 2  # retries after the first attempt; 0 disables retrying
    initial_backoff: float = 0.5  # seconds before the first retry
    max_backoff: float = 8.0  # cap on the exponential backoff
    jitter: float = 0.25  # up to this fraction of each backoff is removed at random (de-synchronises clients)
    max_retry_after: float = 60.0  # a longer Retry-After is capped to this

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("backoff times must be >= 0 and jitter in [0, 1]")

    def delay(self, attempt: int, response: httpx.Response | None, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `attempt + 1` (attempt counts from 0)."""
        if response is not None:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if retry_after is not None:
                return min(retry_after, self.max_retry_after)
        backoff = min(self.max_backoff, self.initial_backoff * 2.0**attempt)
        return backoff * (1.0 - self.jitter * (rng or random).random())


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _wants_retry(request: httpx.Request) -> bool:
    return not request.extensions.get(NO_RETRY, False)


class RetryTransport(httpx.BaseTransport):
    """Wraps a sync transport; retries transient failures according to `policy`."""

    def __init__(self, inner: httpx.BaseTransport, policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep) -> None:
        self._inner, self.policy, self._sleep = inner, policy, sleep

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # a byte body can be sent again; a one-shot stream could not
        retries = self.policy.max_retries if _wants_retry(request) else 0
        attempt = 0
        while True:
            try:
                response = self._inner.handle_request(request)
            except RETRY_EXCEPTIONS:
                if attempt >= retries:
                    raise
                delay = self.policy.delay(attempt, None)
            else:
                if response.status_code not in RETRY_STATUSES or attempt >= retries:
                    return response
                delay = self.policy.delay(attempt, response)
                response.close()
            attempt += 1
            self._sleep(delay)

    def close(self) -> None:
        self._inner.close()


class AsyncRetryTransport(httpx.AsyncBaseTransport):
    """Wraps an async transport; the same policy as `RetryTransport`, sleeping with asyncio."""

    def __init__(
        self, inner: httpx.AsyncBaseTransport, policy: RetryPolicy, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        self._inner, self.policy, self._sleep = inner, policy, sleep

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        retries = self.policy.max_retries if _wants_retry(request) else 0
        attempt = 0
        while True:
            try:
                response = await self._inner.handle_async_request(request)
            except RETRY_EXCEPTIONS:
                if attempt >= retries:
                    raise
                delay = self.policy.delay(attempt, None)
            else:
                if response.status_code not in RETRY_STATUSES or attempt >= retries:
                    return response
                delay = self.policy.delay(attempt, response)
                await response.aclose()
            attempt += 1
            await self._sleep(delay)

    async def aclose(self) -> None:
        await self._inner.aclose()
