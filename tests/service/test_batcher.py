"""The batcher on its own (no HTTP): grouping by shape, result order, the cancel/expiry race,
stopping with work running or queued, a request larger than the whole queue, and the pixel budget
(per call, per decode output, an oversize image alone, and the pool shared by batchers)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from models.core.errors import DeadlineExceeded, Overloaded, QueueFull, ShuttingDown, TooLarge
from service.batcher import BASE_GIB, BYTES_PER_PIXEL, PLAN_HEADROOM, Batcher, PixelPool, _Item, item_pixels, pixel_budget
from service.metrics import Metrics


def make(calls: list[tuple[str, tuple[int, ...]]], **kw: float) -> Batcher:
    """A batcher over a fake model: decode (3-d) sums each grid, encode doubles; `calls` records each call's op and shape."""

    def run(op: str, x: np.ndarray) -> np.ndarray:
        calls.append((op, x.shape))
        return x.sum(axis=(1, 2)) if x.ndim == 3 else x * 2

    return Batcher("m", run, ThreadPoolExecutor(1), Metrics(), **kw)  # type: ignore[arg-type]


def test_same_shapes_join_and_results_keep_their_order() -> None:
    calls: list[tuple[str, tuple[int, ...]]] = []

    async def main() -> list[np.ndarray]:
        b = make(calls, max_batch_size=4, max_delay_s=0.05)
        b.start()
        deadline = time.monotonic() + 10
        arrays = [np.full((1, 2, 2), i) for i in range(6)] + [np.full((1, 3, 3), 7), np.full((3, 2, 2), 9)]
        out = await asyncio.gather(*(b.submit("decode", a, deadline) for a in arrays))
        await b.stop(1)
        return out

    out = asyncio.run(main())
    assert [int(o[0]) for o in out[:6]] == [4 * i for i in range(6)]  # each request got its own result
    assert int(out[6][0]) == 63 and out[7].tolist() == [36, 36, 36]
    small = [shape[0] for _, shape in calls if shape[1:] == (2, 2)]
    assert sum(small) == 9 and max(small) <= 4 and len(small) >= 3  # joined, never past max batch
    assert [shape for _, shape in calls if shape[1:] != (2, 2)] == [(1, 3, 3)]  # never mixed with another shape


def test_take_skips_items_cancelled_before_their_callback_ran() -> None:
    async def main() -> None:
        b = make([], max_batch_size=8)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [_Item(("encode", 2), np.zeros((1, 2)), loop.create_future(), now + 10) for _ in range(3)]
        items[1].deadline = now - 1  # expired
        for it in items:
            it.future.add_done_callback(lambda f, it=it: b._on_done(it))  # type: ignore[misc]
            b._buckets.setdefault(it.key, deque()).append(it)
            b._queued_images += 1
        items[0].future.cancel()  # done now; b._on_done only runs on the next loop iteration
        batch = b._take(("encode", 2))  # must neither run it nor crash on it
        assert batch == [items[2]]
        assert b.queued_images == 0
        with pytest.raises(DeadlineExceeded):
            items[1].future.result()
        await asyncio.sleep(0)  # the late callback finds the item already gone

    asyncio.run(main())


def blocking(gate: threading.Event, entered: threading.Event, **kw: Any) -> Batcher:
    def run(op: str, x: np.ndarray) -> np.ndarray:
        entered.set()
        gate.wait(10)
        return x

    return Batcher("m", run, ThreadPoolExecutor(1), Metrics(), **kw)


def test_stop_fails_the_running_batch_and_the_queue_at_once() -> None:
    gate, entered = threading.Event(), threading.Event()
    loop_errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
        b = blocking(gate, entered, max_batch_size=1, max_delay_s=0)
        b.start()
        deadline = time.monotonic() + 60
        running = asyncio.ensure_future(b.submit("decode", np.zeros((1, 2)), deadline))
        await asyncio.to_thread(entered.wait, 10)
        queued = [asyncio.ensure_future(b.submit("decode", np.zeros((1, 2)), deadline)) for _ in range(2)]
        queued.append(asyncio.ensure_future(b.submit("encode", np.zeros((1, 3)), deadline)))
        await asyncio.sleep(0.01)
        assert b.queued_images == 3
        t0 = time.monotonic()
        await b.stop(drain_timeout_s=0.05)
        # every request is answered now, not at its deadline (a minute away)
        done, pending = await asyncio.wait([running, *queued], timeout=30)
        assert not pending, "requests left hanging after stop()"
        assert time.monotonic() - t0 < 30  # half the deadline: a margin against a busy machine
        for f in done:
            with pytest.raises(ShuttingDown):
                f.result()
        await asyncio.sleep(0.01)  # the done-callbacks of the queued items run now
        assert b.queued_images == 0 and not b._buckets and not b.busy
        with pytest.raises(ShuttingDown):
            await b.submit("decode", np.zeros((1, 2)), deadline)

    try:
        asyncio.run(main())
    finally:
        gate.set()
    assert loop_errors == []  # no KeyError from a done-callback looking for a cleared bucket


def test_a_request_larger_than_the_queue_is_too_large_not_queue_full() -> None:
    async def main() -> None:
        b = make([], max_batch_size=2, max_queue_images=4)
        b.start()
        deadline = time.monotonic() + 10
        with pytest.raises(TooLarge):
            await b.submit("decode", np.zeros((5, 2)), deadline)
        assert (await b.submit("decode", np.ones((4, 2)), deadline)).shape == (4, 2)  # a full queue's worth fits
        await b.stop(1)

    asyncio.run(main())
    assert not issubclass(TooLarge, QueueFull)  # a retry can never help: not a 503


def test_refusals_carry_their_answer() -> None:
    """The batcher's refusals are core problems: the status, type and Retry-After are theirs, written once."""
    from service.problems import problem_headers

    assert (TooLarge.status, TooLarge.slug, TooLarge.retry) == (413, "too-large", False)
    assert (QueueFull.status, QueueFull.slug, QueueFull.retry) == (503, "queue-full", True)
    assert (DeadlineExceeded.status, DeadlineExceeded.slug) == (504, "deadline-exceeded")
    assert problem_headers(QueueFull("x"), retry_after_s=3) == {"Retry-After": "3"}
    assert problem_headers(QueueFull("x", retry_after_s=7.4), retry_after_s=3) == {"Retry-After": "7"}
    assert problem_headers(TooLarge("x"), retry_after_s=3) == {}


# --- admission by deadline ---


def slow(seconds: float, **kw: Any) -> Batcher:
    """A batcher whose every batch takes `seconds` (one image a batch)."""

    def run(op: str, x: np.ndarray) -> np.ndarray:
        time.sleep(seconds)
        return x

    return Batcher("m", run, ThreadPoolExecutor(1), Metrics(), max_batch_size=1, max_delay_s=0.0, **kw)


def test_a_request_the_queue_would_make_late_is_refused_at_once_and_the_admitted_all_finish() -> None:
    """Batches of 0.2 s one after another, planned with the headroom (0.25 s each), deadlines 0.9 s away:
    three fit (0.25, 0.5, 0.75 s), the fourth would end at 1.0 s. It and every later one are refused on
    arrival, with the queue's drain time as Retry-After; none admitted runs out of time."""

    async def main() -> tuple[list[object], list[float], float]:
        b = slow(0.2)
        b.start()
        for _ in range(3):  # what a pixel costs, learned from the batches run
            await b.submit("encode", np.zeros((1, 4, 4, 3), np.uint8), time.monotonic() + 10)
        assert PLAN_HEADROOM == 1.25
        deadline = time.monotonic() + 0.9
        refused_after: list[float] = []

        async def one() -> object:
            t0 = time.monotonic()
            try:
                return await b.submit("encode", np.zeros((1, 4, 4, 3), np.uint8), deadline)
            except Overloaded as exc:
                refused_after.append(time.monotonic() - t0)
                return exc

        out = await asyncio.gather(*(one() for _ in range(8)))
        drain = b.drain_seconds() or 0.0
        await b.stop(1)
        return list(out), refused_after, drain

    out, refused_after, drain = asyncio.run(main())
    ok = [o for o in out if isinstance(o, np.ndarray)]
    refused = [o for o in out if isinstance(o, Overloaded)]
    assert len(ok) == 3 and len(refused) == 5  # no DeadlineExceeded among them: the admitted all finished
    assert max(refused_after) < 0.05  # refused on arrival, not after waiting
    assert all(r.retry_after_s is not None and r.retry_after_s >= 1.0 for r in refused)
    assert (Overloaded.status, Overloaded.slug, Overloaded.retry) == (503, "overloaded", True)
    assert drain == 0.0


def test_a_batch_stops_growing_where_it_would_make_its_earliest_item_late() -> None:
    """Every image costs 0.1 s and a batch ends all its items at once. While a 5-image batch runs (0.5 s), one
    request with a deadline 0.75 s away and six with distant deadlines are admitted; the next batch takes the
    first and only as many more as still end by 0.75 s (one), so it is answered in time; the others follow."""

    def run(op: str, x: np.ndarray) -> np.ndarray:
        time.sleep(0.1 * x.shape[0])
        return x

    async def main() -> tuple[float, float, list[int]]:
        b = Batcher("m", run, ThreadPoolExecutor(1), Metrics(), max_batch_size=16, max_delay_s=0.0)  # type: ignore[arg-type]
        sizes: list[int] = []
        original = b._take

        def take(key: Any) -> list[_Item]:
            batch = original(key)
            sizes.append(sum(item.n for item in batch))
            return batch

        b._take = take  # type: ignore[method-assign]
        b.start()
        for _ in range(3):  # what a pixel costs
            await b.submit("encode", np.zeros((1, 4, 4, 3), np.uint8), time.monotonic() + 10)
        running = asyncio.ensure_future(b.submit("encode", np.zeros((5, 4, 4, 3), np.uint8), time.monotonic() + 10))
        await asyncio.sleep(0.02)  # the 5-image batch is running
        tight = time.monotonic() + 0.75
        first = asyncio.ensure_future(b.submit("encode", np.zeros((1, 4, 4, 3), np.uint8), tight))
        others = [asyncio.ensure_future(b.submit("encode", np.zeros((1, 4, 4, 3), np.uint8), time.monotonic() + 10)) for _ in range(6)]
        await first
        answered = time.monotonic()
        await asyncio.gather(running, *others)
        await b.stop(1)
        return answered, tight, sizes[3:]

    answered, tight, sizes = asyncio.run(main())
    assert answered <= tight  # before this change the next batch took all seven: 0.7 s, ending ≈ 1.2 s
    assert sizes[:2] == [5, 2] and sum(sizes[2:]) == 5


def test_a_stalled_batch_cannot_lock_the_model_out_an_idle_model_runs_what_comes() -> None:
    """One batch that stalled (0.6 s for what costs 0.01 s) makes the estimate say a request cannot finish in
    0.3 s; on an idle model it is admitted and run anyway, which is how the estimate learns it was wrong."""
    delays = [0.6]

    def run(op: str, x: np.ndarray) -> np.ndarray:
        time.sleep(delays.pop() if delays else 0.01)
        return x

    async def main() -> int:
        b = Batcher("m", run, ThreadPoolExecutor(1), Metrics(), max_batch_size=1, max_delay_s=0.0)  # type: ignore[arg-type]
        b.start()
        await b.submit("encode", np.zeros((1, 4, 4, 3), np.uint8), time.monotonic() + 10)  # the stall
        done = 0
        for _ in range(5):
            await b.submit("encode", np.zeros((1, 4, 4, 3), np.uint8), time.monotonic() + 0.3)
            done += 1
        await b.stop(1)
        return done

    assert asyncio.run(main()) == 5


def test_nothing_is_refused_before_the_batcher_knows_what_a_batch_costs() -> None:
    async def main() -> list[np.ndarray]:
        b = slow(0.05)
        b.start()
        deadline = time.monotonic() + 10
        out = await asyncio.gather(*(b.submit("encode", np.zeros((1, 4, 4, 3), np.uint8), deadline) for _ in range(4)))
        await b.stop(1)
        return list(out)

    assert len(asyncio.run(main())) == 4


def test_service_time_follows_full_batches_and_ignores_one_stalled_batch() -> None:
    from service.batcher import ServiceTime

    t = ServiceTime(least=3)
    assert t.per_pixel("encode") is None
    t.observe("decode", 2, 3.0, full=False)
    assert t.per_pixel("decode") == 1.5  # a cold server plans with the one batch it has measured
    for seconds in (1.0, 1.0, 9.0):  # small batches: a pixel costs 1 s, one stalled batch aside
        t.observe("encode", 1, seconds, full=False)
    assert t.per_pixel("encode") == 1.0  # the median, not the stall
    for _ in range(3):
        t.observe("encode", 4, 2.0, full=True)  # full batches share the call's cost: 0.5 s a pixel
    assert t.per_pixel("encode") == 0.5 and t.per_pixel("decode") == 1.5


# --- the pixel budget ---


def test_batches_hold_at_most_max_batch_pixels() -> None:
    calls: list[tuple[str, tuple[int, ...]]] = []

    async def main() -> list[np.ndarray]:
        # 4×4 images are 16 pixels: a budget of 50 holds 3 of them, fewer than max_batch_size
        b = make(calls, max_batch_size=8, max_delay_s=0.05, max_batch_pixels=50)
        b.start()
        deadline = time.monotonic() + 10
        arrays = [np.full((7, 4, 4, 3), 1), np.full((2, 4, 4, 3), 2), np.full((1, 2, 2, 3), 3)]
        out = await asyncio.gather(*(b.submit("encode", a, deadline) for a in arrays))
        await b.stop(1)
        return out

    out = asyncio.run(main())
    assert [o.shape[0] for o in out] == [7, 2, 1] and int(out[0][6].max()) == 2 and int(out[1].max()) == 4
    big = [shape[0] for _, shape in calls if shape[1:3] == (4, 4)]
    assert sum(big) == 9 and max(big) == 3  # never past 50 pixels (3 × 16), never mixed
    assert [shape for _, shape in calls if shape[1:3] == (2, 2)] == [(1, 2, 2, 3)]


def test_decode_counts_the_output_pixels_and_an_oversize_image_runs_alone() -> None:
    calls: list[tuple[str, tuple[int, ...]]] = []

    async def main() -> None:
        b = make(calls, max_batch_size=8, max_delay_s=0.05, max_batch_pixels=150, downsample=4)
        b.start()
        deadline = time.monotonic() + 10
        assert b.image_pixels(("decode", 2, 3)) == 2 * 3 * 16 and b.batch_limit(("decode", 2, 3)) == 1
        assert b.image_pixels(("encode", 8, 12, 3)) == 96 and b.batch_limit(("encode", 8, 12, 3)) == 1
        assert b.batch_limit(("decode", 1, 2)) == 4  # 32 output pixels each
        await asyncio.gather(b.submit("decode", np.ones((3, 2, 3)), deadline), b.submit("decode", np.ones((5, 1, 2)), deadline))
        # a grid above the whole budget (4×4 -> 256 output pixels) is not refused here: it runs alone
        assert (await b.submit("decode", np.ones((2, 4, 4)), deadline)).tolist() == [16, 16]
        await b.stop(1)

    asyncio.run(main())
    assert sorted(shape[0] for _, shape in calls if shape[1:] == (2, 3)) == [1, 1, 1]
    assert sorted(shape[0] for _, shape in calls if shape[1:] == (1, 2)) == [1, 4]
    assert [shape for _, shape in calls if shape[1:] == (4, 4)] == [(1, 4, 4), (1, 4, 4)]


def test_a_shared_pixel_pool_bounds_the_calls_running_at_once() -> None:
    """Two models, two workers each, one pool: the pixels in inference at any moment stay within it."""
    lock = threading.Lock()
    running = [0]
    peak = [0]

    def run(op: str, x: np.ndarray) -> np.ndarray:
        with lock:
            running[0] += x.shape[0] * x.shape[1] * x.shape[2]
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= x.shape[0] * x.shape[1] * x.shape[2]
        return x

    async def main() -> None:
        pool = PixelPool(48)  # three 4×4 images
        kw: dict[str, Any] = dict(max_batch_size=2, max_delay_s=0, max_batch_pixels=48, workers=2, pixel_pool=pool)
        batchers = [Batcher(f"m{i}", run, ThreadPoolExecutor(2), Metrics(), **kw) for i in range(2)]
        for b in batchers:
            b.start()
        deadline = time.monotonic() + 20
        jobs = [b.submit("encode", np.zeros((1, 4, 4, 3)), deadline) for _ in range(12) for b in batchers]
        assert all(r.shape == (1, 4, 4, 3) for r in await asyncio.gather(*jobs))
        assert pool.in_use == 0
        for b in batchers:
            await b.stop(1)

    asyncio.run(main())
    assert 16 <= peak[0] <= 48


def test_pixel_pool_is_first_come_first_served_and_gives_back_what_a_cancelled_waiter_held() -> None:
    async def main() -> None:
        pool = PixelPool(10)
        assert await pool.acquire(6) == 6
        big = asyncio.ensure_future(pool.acquire(30))  # above the capacity: it waits for the whole pool
        await asyncio.sleep(0)
        small = asyncio.ensure_future(pool.acquire(2))  # would fit now, but queues behind the big one
        await asyncio.sleep(0)
        assert not big.done() and not small.done()
        pool.release(6)
        assert await big == 10 and not small.done()
        pool.release(10)
        assert await small == 2
        waiting = asyncio.ensure_future(pool.acquire(9))
        after = asyncio.ensure_future(pool.acquire(1))
        await asyncio.sleep(0)
        waiting.cancel()  # leaving the queue lets the one behind it in
        assert await after == 1
        assert pool.in_use == 3
        pool.release(3)
        assert pool.in_use == 0

    asyncio.run(main())


def test_the_memory_rule_matches_its_documentation() -> None:
    from service.settings import Settings

    assert item_pixels(("encode", 1024, 1024, 3)) == 1024**2 and item_pixels(("decode", 128, 128), 8) == 1024**2
    budget = pixel_budget(4.0)
    assert budget == int(3.5 * 2**30 / 2200) and 1024**2 <= budget < 2 * 1024**2 and budget // 256**2 == 26
    assert pixel_budget(0.1) == 256 * 256  # a budget below the process's own size: the floor
    described = Settings.model_fields["memory_budget_gib"].description or ""
    assert f"- {BASE_GIB:g}) GiB / {BYTES_PER_PIXEL} bytes" in described and "1.71 Mpx" in described
    assert Settings.model_fields["memory_budget_gib"].default <= 4
