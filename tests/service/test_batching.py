"""The dynamic batcher over real HTTP: concurrent requests are joined and give the same tokens as
sequential ones; a full queue answers 503 and recovers; deadlines answer 504; a client that leaves
takes its work with it; a failing batch fails only its own requests; shutdown drains."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from .conftest import Faults, FaultyRuntime, metric_value, photo_crop, png_bytes
from .test_errors import assert_problem

NPY = "application/x-npy"


def encode(c: httpx.Client, img: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    # resize=none: the images keep their shapes, so the shape decides the bucket (crop would make them all one)
    return c.post(
        "/v1/encode", params={"resize": "none"}, files={"images": ("x.png", img, "image/png")}, headers={"Accept": NPY, **(headers or {})}
    )


def wait_until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def occupy(faults: Faults, pool: ThreadPoolExecutor, c: httpx.Client, img: bytes) -> Future[httpx.Response]:
    """Send one request and return once it is inside the (gated) model: what follows queues behind it."""
    faults.gate.clear()
    faults.entered.clear()
    first = pool.submit(encode, c, img)
    assert faults.entered.wait(10)
    return first


def queue_depth(c: httpx.Client, model: str = "fsq4") -> float:
    return metric_value(c.get("/metrics").text, "vqtok_queue_depth", model=model)


def test_200_concurrent_requests_equal_sequential_and_batch(serve, photos: list[Path]) -> None:  # type: ignore[no-untyped-def]
    s = serve(max_batch_size=16, max_batch_delay_ms=20, default_model="fsq4")
    imgs = [png_bytes(photo_crop(p, 32)) for p in photos[:20]]
    requests = [imgs[i % len(imgs)] for i in range(200)]
    with httpx.Client(base_url=s.url, timeout=60) as c:
        sequential = [np.load(io.BytesIO(encode(c, img).content)) for img in imgs]

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=s.url, timeout=60, limits=limits) as ac:
            return await asyncio.gather(
                *(ac.post("/v1/encode", files={"images": ("x.png", img, "image/png")}, headers={"Accept": NPY}) for img in requests)
            )

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 200
    for i, r in enumerate(responses):
        np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), sequential[i % len(imgs)])
    with httpx.Client(base_url=s.url) as c:
        metrics = c.get("/metrics").text
    calls = metric_value(metrics, "vqtok_batch_size_count", model="fsq4", op="encode")
    images = metric_value(metrics, "vqtok_batch_size_sum", model="fsq4", op="encode")
    assert images == 220
    assert calls < 200 * 0.5, f"{calls} inference calls for 220 images: requests were not batched"
    assert metric_value(metrics, "vqtok_batch_size_bucket", model="fsq4", op="encode", le="1.0") < calls  # some batch > 1
    assert metric_value(metrics, "vqtok_http_requests_total", route="/v1/encode", status="200") == 220


def test_full_queue_answers_503_then_recovers(serve, faults: Faults) -> None:  # type: ignore[no-untyped-def]
    s = serve(loader=faults.loader, max_batch_size=1, max_queue_images=3, max_images_per_request=3, max_batch_delay_ms=0, retry_after_s=2)
    img = png_bytes(np.full((32, 32, 3), 50, np.uint8))
    with httpx.Client(base_url=s.url, timeout=30) as c, ThreadPoolExecutor(8) as pool:
        running = occupy(faults, pool, c, img)  # inside the model; the queue is empty
        queued = [pool.submit(encode, c, img) for _ in range(3)]
        wait_until(lambda: queue_depth(c) == 3)
        r = encode(c, img)
        assert_problem(r, 503, "queued")
        assert r.headers["retry-after"] == "2"
        assert metric_value(c.get("/metrics").text, "vqtok_rejected_total", reason="queue_full") == 1
        faults.gate.set()
        assert [f.result().status_code for f in [running, *queued]] == [200] * 4
        assert encode(c, img).status_code == 200  # recovered
        assert queue_depth(c) == 0


def test_deadline_answers_504_and_frees_the_queue(serve, faults: Faults) -> None:  # type: ignore[no-untyped-def]
    s = serve(loader=faults.loader, max_batch_size=1, request_timeout_s=0.5)
    img = png_bytes(np.full((32, 32, 3), 60, np.uint8))
    with httpx.Client(base_url=s.url, timeout=30) as c, ThreadPoolExecutor(4) as pool:
        first = occupy(faults, pool, c, img)
        t0 = time.monotonic()
        r = encode(c, img)  # waits in the queue behind the blocked batch
        assert_problem(r, 504, "deadline")
        assert 0.4 < time.monotonic() - t0 < 20  # at its deadline, not at the client's timeout (30 s)
        assert queue_depth(c) == 0  # the expired request left the queue
        # a client may shorten (never lengthen) the deadline
        assert_problem(encode(c, img, headers={"X-Request-Timeout": "0.1"}), 504, "0.1")
        faults.gate.set()
        assert first.result().status_code == 504  # its own deadline passed while the model ran
        n_batches = len(faults.batches)
        assert encode(c, img).status_code == 200
        assert len(faults.batches) == n_batches + 1  # the expired requests never ran


def test_disconnected_client_is_dropped_before_running(serve, faults: Faults) -> None:  # type: ignore[no-untyped-def]
    s = serve(loader=faults.loader, max_batch_size=1)
    img = png_bytes(np.full((32, 32, 3), 70, np.uint8))
    with httpx.Client(base_url=s.url, timeout=30) as c, ThreadPoolExecutor(4) as pool:
        first = occupy(faults, pool, c, img)
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=s.url, timeout=httpx.Timeout(30, read=0.3)) as impatient:
            encode(impatient, img)
        wait_until(lambda: queue_depth(c) == 0)
        assert metric_value(c.get("/metrics").text, "vqtok_rejected_total", reason="cancelled") == 1
        faults.gate.set()
        assert first.result().status_code == 200
        assert faults.batches == [1]  # the first request ran; the one that left never did (warm-up bypasses the gate)
        assert encode(c, img).status_code == 200
        assert faults.batches == [1, 1]


def test_failing_batch_fails_only_its_requests(serve, faults: Faults) -> None:  # type: ignore[no-untyped-def]
    s = serve(loader=faults.loader, max_batch_size=8, max_batch_delay_ms=50)
    blocker = png_bytes(np.full((32, 32, 3), 10, np.uint8))
    good = png_bytes(np.full((32, 32, 3), 80, np.uint8))
    poison = np.full((32, 32, 3), 80, np.uint8)
    poison[0, 0] = FaultyRuntime.POISON
    oom = np.full((32, 32, 3), 80, np.uint8)
    oom[0, 0] = FaultyRuntime.OOM
    odd = png_bytes(np.full((32, 64, 3), 80, np.uint8))  # another shape: another bucket, another batch
    with httpx.Client(base_url=s.url, timeout=30) as c, ThreadPoolExecutor(8) as pool:
        first = occupy(faults, pool, c, blocker)  # the one worker is inside the model: everything below queues
        futures = [pool.submit(encode, c, png_bytes(poison)), pool.submit(encode, c, good), pool.submit(encode, c, odd)]
        wait_until(lambda: queue_depth(c) == 3)
        faults.gate.set()
        assert first.result().status_code == 200
        statuses = [f.result().status_code for f in futures]
        # poison and good were queued in one bucket together, so they ran (and failed) as one batch;
        # the other shape ran in its own batch and is untouched
        assert statuses == [500, 500, 200]
        assert faults.batches[0] == 1 and sorted(faults.batches[1:]) == [1, 2]
        assert_problem(futures[0].result(), 500, "inference failed")
        assert_problem(futures[1].result(), 500, "inference failed")
        r = encode(c, png_bytes(oom))
        assert_problem(r, 503, "out of memory")
        assert "retry-after" in r.headers
        assert encode(c, good).status_code == 200  # the batcher keeps serving; alone, good succeeds
        assert metric_value(c.get("/metrics").text, "vqtok_batch_failures_total", model="fsq4") == 2


def test_shutdown_drains_in_flight_requests(serve, faults: Faults) -> None:  # type: ignore[no-untyped-def]
    s = serve(loader=faults.loader)
    img = png_bytes(np.full((32, 32, 3), 90, np.uint8))
    with httpx.Client(base_url=s.url, timeout=30) as c, ThreadPoolExecutor(2) as pool:
        pending = occupy(faults, pool, c, img)
        stopper = threading.Thread(target=s.stop)
        stopper.start()
        time.sleep(0.3)
        faults.gate.set()
        assert pending.result().status_code == 200
        stopper.join(30)
        assert not s.thread.is_alive()


def test_deadline_metric_is_labelled_with_the_served_model_not_the_query(serve, faults: Faults) -> None:  # type: ignore[no-untyped-def]
    s = serve(loader=faults.loader, max_batch_size=1)
    img = png_bytes(np.full((32, 32, 3), 65, np.uint8))
    with httpx.Client(base_url=s.url, timeout=30) as c, ThreadPoolExecutor(2) as pool:
        first = occupy(faults, pool, c, img)
        # the form field names the model; the query string carries an arbitrary client string
        r = c.post(
            "/v1/encode?model=client-chosen-label-123",
            files={"images": ("x.png", img, "image/png")},
            data={"model": "fsq4"},
            headers={"Accept": NPY, "X-Request-Timeout": "0.3"},
        )
        assert_problem(r, 504, "deadline")
        metrics = c.get("/metrics").text
        assert "client-chosen-label-123" not in metrics
        assert metric_value(metrics, "vqtok_rejected_total", model="fsq4", reason="deadline") == 1
        faults.gate.set()
        first.result()


def test_json_encode_over_1024_images_is_413_not_422(client: httpx.Client) -> None:
    r = client.post("/v1/encode", json={"images": ["AAAA"] * 1100})
    assert_problem(r, 413, "1100 images")


def test_settings_require_the_queue_to_hold_one_full_request() -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match=r"max_queue_images \(8\) must be at least max_images_per_request \(9\)"):
        Settings(max_queue_images=8, max_images_per_request=9)
    Settings(max_queue_images=9, max_images_per_request=9)
