"""The batcher on its own (no HTTP): grouping by shape, result order, and the cancel/expiry race."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batcher import BatchDeadlineExceeded, Batcher, _Item
from service.metrics import Metrics


def make(calls: list[tuple[str, tuple[int, ...]]], **kw: float) -> Batcher:
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
        with pytest.raises(BatchDeadlineExceeded):
            items[1].future.result()
        await asyncio.sleep(0)  # the late callback finds the item already gone

    asyncio.run(main())
