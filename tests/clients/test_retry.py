"""Retry behaviour and error mapping of the HTTP clients, against `httpx.MockTransport` (no server)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from PIL import Image

from clients import _base
from clients._retry import AsyncRetryTransport, RetryPolicy, RetryTransport, parse_retry_after
from clients.client import AsyncClient, Client
from clients.errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    UnsupportedMediaTypeError,
    ValidationError,
    VqtokError,
)

GRID = np.arange(16, dtype=np.int32).reshape(1, 4, 4)


def problem(status: int, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"type": f"urn:vqtok:problem:{status}", "title": "x", "status": status, "detail": f"detail {status}"}
    return httpx.Response(status, content=json.dumps(body), headers={"content-type": "application/problem+json", **(headers or {})})


def ok_npy(n: int = 1) -> httpx.Response:
    return httpx.Response(200, content=_base.npy_bytes(np.repeat(GRID, n, axis=0)), headers={"content-type": "application/x-npy"})


class Script:
    """A mock server answering from a list of responses (or exceptions), recording the requests."""

    def __init__(self, answers: list[httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer(request) if callable(answer) else answer


def make_client(script: Script, max_retries: int = 2) -> tuple[Client, list[float]]:
    sleeps: list[float] = []
    client = Client("http://test", max_retries=max_retries, transport=httpx.MockTransport(script))
    # the sleep is injected so the backoff is observable and the test does not wait
    assert isinstance(client._http._transport, RetryTransport)
    client._http._transport._sleep = sleeps.append
    return client, sleeps


IMG = np.zeros((8, 8, 3), np.uint8)


@pytest.mark.parametrize("status", [408, 429, 503, 504])
def test_transient_statuses_are_retried_then_succeed(status: int) -> None:
    script = Script([problem(status), problem(status), ok_npy()])
    client, sleeps = make_client(script)
    grid = client.encode(IMG)
    np.testing.assert_array_equal(grid, GRID[0])
    assert len(script.requests) == 3 and len(sleeps) == 2
    # the body is sent again intact on each attempt
    assert script.requests[0].content == script.requests[2].content and b"\x89PNG" in script.requests[2].content


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (404, NotFoundError),
        (413, PayloadTooLargeError),
        (415, UnsupportedMediaTypeError),
        (422, ValidationError),
        (500, ServerError),
        (502, ServerError),
    ],
)
def test_other_errors_are_not_retried_and_are_typed(status: int, error: type[Exception]) -> None:
    script = Script([problem(status), ok_npy()])
    client, sleeps = make_client(script)
    with pytest.raises(error) as info:
        client.encode(IMG)
    assert len(script.requests) == 1 and sleeps == []
    assert info.value.status == status and info.value.detail == f"detail {status}"  # type: ignore[attr-defined]
    assert isinstance(info.value, VqtokError)


@pytest.mark.parametrize(
    ("status", "error"), [(503, OverloadedError), (504, RequestTimeoutError), (429, RateLimitError), (408, RequestTimeoutError)]
)
def test_gives_up_after_max_retries(status: int, error: type[Exception]) -> None:
    script = Script([problem(status)])
    client, sleeps = make_client(script, max_retries=3)
    with pytest.raises(error):
        client.encode(IMG)
    assert len(script.requests) == 4 and len(sleeps) == 3


def test_backoff_is_capped_exponential_with_jitter() -> None:
    policy = RetryPolicy(max_retries=10, initial_backoff=0.5, max_backoff=4.0, jitter=0.25)
    for attempt, nominal in enumerate([0.5, 1.0, 2.0, 4.0, 4.0, 4.0]):
        delays = [policy.delay(attempt, None) for _ in range(200)]
        assert all(0.75 * nominal <= d <= nominal for d in delays)
        assert max(delays) - min(delays) > 0.05 * nominal  # jitter is there


def test_retry_after_is_honoured_exactly() -> None:
    script = Script([problem(503, {"Retry-After": "3"}), problem(429, {"Retry-After": "0.25"}), ok_npy()])
    client, sleeps = make_client(script)
    client.encode(IMG)
    assert sleeps == [3.0, 0.25]


def test_retry_after_parsing() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: retry now
    assert RetryPolicy(max_retry_after=10).delay(0, problem(503, {"Retry-After": "3600"})) == 10


def test_connection_errors_are_retried_then_raise_typed() -> None:
    script = Script([httpx.ConnectError("refused"), ok_npy()])
    client, sleeps = make_client(script)
    np.testing.assert_array_equal(client.encode(IMG), GRID[0])
    assert len(script.requests) == 2 and len(sleeps) == 1

    script = Script([httpx.ConnectError("refused")])
    client, sleeps = make_client(script, max_retries=2)
    with pytest.raises(APIConnectionError):
        client.encode(IMG)
    assert len(script.requests) == 3


def test_read_timeout_is_not_retried() -> None:
    script = Script([httpx.ReadTimeout("slow"), ok_npy()])
    client, _ = make_client(script)
    with pytest.raises(APIConnectionError):  # APITimeoutError is an APIConnectionError
        client.encode(IMG)
    assert len(script.requests) == 1


def test_readiness_probe_is_never_retried() -> None:
    script = Script([problem(503, {"Retry-After": "1"}), httpx.Response(200, json={"ready": True})])
    client, sleeps = make_client(script)
    assert client.ready() is False
    assert len(script.requests) == 1 and sleeps == []


def test_async_client_retries_with_the_same_policy() -> None:
    script = Script([problem(503, {"Retry-After": "2"}), httpx.ConnectError("reset"), ok_npy()])
    sleeps: list[float] = []

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    async def run() -> np.ndarray:
        async with AsyncClient("http://test", transport=httpx.MockTransport(script)) as client:
            assert isinstance(client._http._transport, AsyncRetryTransport)
            client._http._transport._sleep = fake_sleep
            return await client.encode(IMG)

    np.testing.assert_array_equal(asyncio.run(run()), GRID[0])
    assert len(script.requests) == 3 and sleeps[0] == 2.0 and 0.375 <= sleeps[1] <= 1.0


def test_async_gives_up_and_maps_errors() -> None:
    script = Script([problem(504)])

    async def run() -> None:
        async with AsyncClient("http://test", max_retries=1, transport=httpx.MockTransport(script)) as client:
            client._http._transport._sleep = lambda s: asyncio.sleep(0)  # type: ignore[attr-defined]
            await client.encode(IMG)

    with pytest.raises(RequestTimeoutError):
        asyncio.run(run())
    assert len(script.requests) == 2


def test_large_inputs_are_split_in_order_with_bounded_concurrency() -> None:
    in_flight, peak = 0, 0
    lock = threading.Lock()

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.02)
        # each image is a constant-valued 8x8 array; answer with that value so the order is checkable
        pngs = re.findall(rb"\x89PNG.*?IEND\xaeB`\x82", request.content, flags=re.S)
        values = [int(np.asarray(Image.open(io.BytesIO(p)))[0, 0, 0]) for p in pngs]
        n = len(values)
        with lock:
            in_flight -= 1
        return httpx.Response(
            200, content=_base.npy_bytes(np.array(values, np.int32).reshape(n, 1, 1)), headers={"content-type": "application/x-npy"}
        )

    script = Script([answer])
    client = Client("http://test", max_concurrency=3, max_images_per_request=4, transport=httpx.MockTransport(script))
    images = [np.full((8, 8, 3), i, np.uint8) for i in range(22)]
    grids = client.encode(images)
    posts = [r for r in script.requests if r.method == "POST"]
    assert len(posts) == 6  # 22 images, at most 4 a request
    assert all(r.content.count(b'name="images"') <= 4 for r in posts)
    assert 1 < peak <= 3
    assert [int(g[0, 0]) for g in grids] == list(range(22))


def test_413_splits_a_request_in_halves() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        n = request.content.count(b'name="images"')
        return problem(413) if n > 2 else ok_npy(n)

    script = Script([answer])
    client = Client("http://test", transport=httpx.MockTransport(script))
    grids = client.encode([IMG] * 8)
    assert len(grids) == 8
    posts = [r for r in script.requests if r.method == "POST"]
    assert [r.content.count(b'name="images"') for r in posts] == [8, 4, 2, 2, 4, 2, 2]


def test_server_limits_and_grid_groups_shape_the_requests() -> None:
    """The client caps requests at the limits `GET /v1/models` states, and sends images of different
    sizes in different requests (one npy answer holds one grid shape); results keep input order."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"models": [], "limits": {"max_images_per_request": 3, "max_body_bytes": 1 << 20}})
        pngs = re.findall(rb"\x89PNG.*?IEND\xaeB`\x82", request.content, flags=re.S)
        arrays = [np.asarray(Image.open(io.BytesIO(p))) for p in pngs]
        assert len({a.shape for a in arrays}) == 1, "a request mixed image sizes"
        grids = np.stack([np.full((a.shape[0] // 4, a.shape[1] // 4), a[0, 0, 0], np.int32) for a in arrays])
        return httpx.Response(200, content=_base.npy_bytes(grids), headers={"content-type": "application/x-npy"})

    script = Script([answer])
    client = Client("http://test", transport=httpx.MockTransport(script))
    images = [np.full((8, 8 if i % 2 else 12, 3), i, np.uint8) for i in range(10)]
    grids = client.encode(images, resize="none")  # crop, the default, gives every image one grid: one group
    posts = [r for r in script.requests if r.method == "POST"]
    assert max(r.content.count(b'name="images"') for r in posts) == 3 and len(posts) == 4
    assert [int(g[0, 0]) for g in grids] == list(range(10))
    assert [g.shape for g in grids] == [(2, 3) if i % 2 == 0 else (2, 2) for i in range(10)]


def test_user_agent_and_auth_header() -> None:
    script = Script([httpx.Response(200, json={"status": "ok"})])
    client = Client("http://test", api_key="secret-key", transport=httpx.MockTransport(script))
    client.health()
    headers = script.requests[0].headers
    assert headers["authorization"] == "Bearer secret-key"
    assert headers["user-agent"].startswith("vqtok-python/") and "httpx/" in headers["user-agent"]
    assert isinstance(client._http.timeout, httpx.Timeout) and client._http.timeout.connect == 5.0
