"""Per-model dynamic batcher (after Triton's dynamic batcher and TEI's queue).

Requests arrive as arrays of n ≥ 1 same-shape images (or token grids) under a key `(op, *shape)`.
Items with the same key wait in one bucket; a worker takes the bucket whose oldest item is oldest,
waits up to `max_delay_s` for the bucket to reach its batch limit, and runs the whole bucket as one
inference call in a thread, so the event loop stays free for I/O while the model runs.

- A batch holds at most `max_batch_size` images and at most `max_batch_pixels` pixels (encode: the
  images' H·W; decode: the output's h·w·f²), whichever is fewer images; an image above the pixel
  limit on its own runs alone. The pixels of all calls running at once are bounded too: every batch
  takes its pixels from a `PixelPool` (one per process, shared by every model and worker) before it
  runs, and waits, first come first served, while the pool is spent. On the CPU a batch's peak memory
  is about proportional to its pixels (`BYTES_PER_PIXEL`), so this is what bounds the server's memory.

- The queue is bounded in images: `submit` raises `QueueFull` at once rather than letting latency grow,
  and `TooLarge` for a request that could never fit however empty the queue is.
- Admission by deadline: from the batches it has run, the batcher knows what a pixel of each op costs
  (`ServiceTime`); a request whose turn would come after its deadline, given the work queued ahead of it
  and its own, is refused on arrival with `Overloaded` (503, with the time the queue needs to drain as
  `Retry-After`) instead of waiting out its deadline for a 504. When a batch forms, an item that could
  not finish before its deadline even if it ran now fails at once, so no batch spends the model's time
  on answers nobody will take. Until a batch of an op has run, nothing is refused for lack of time.
- An item whose future was cancelled (its client went away, or its deadline passed) leaves the
  queue immediately and never runs; an item found expired when a batch forms fails with
  `DeadlineExceeded`.
- An exception from an inference call fails only the futures of that batch; the worker goes on.
- `stop` fails whatever is still queued, and the batch running when its worker is cancelled, with
  `ShuttingDown`, so no request waits for its deadline on a batcher that has gone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from models.core.errors import DeadlineExceeded, Overloaded, QueueFull, ShuttingDown, TooLarge, inference_problem

from .metrics import Metrics

log = logging.getLogger("vqtok.batcher")

Key = tuple[Hashable, ...]  # (op, *item_shape), e.g. ("encode", 256, 256, 3)
RunFn = Callable[[str, np.ndarray], np.ndarray]  # (op, batch) -> batch of results, same leading size


# The memory rule of a CPU server: one batch raises the process's peak resident set by at most
# BYTES_PER_PIXEL per pixel of the batch, the worst rate of the shipped model (fp32, ONNX Runtime with
# its CPU arena off, see models/runtime/onnx.session_options) rounded up. The worst is the encoder's at the largest
# image the default limits allow (1024², 16384 tokens: the bottleneck's attention is quadratic in the
# grid), from the second run of a shape on (ORT's memory pattern plans one block for the run); smaller
# images and decoding cost less a pixel (BENCHMARKS.md, "Memory"). BASE_GIB covers what a `vqtok serve`
# process holds before any batch (models loaded and warmed), requests in flight and malloc's leftovers.
BYTES_PER_PIXEL = 2200
BASE_GIB = 0.5
MIN_BATCH_PIXELS = 256 * 256


def pixel_budget(memory_budget_gib: float) -> int:
    """`max_batch_pixels` from a memory budget: (budget − BASE_GIB) / BYTES_PER_PIXEL, at least 256²
    (a budget below the process's own size cannot be kept by batching)."""
    return max(MIN_BATCH_PIXELS, int((memory_budget_gib - BASE_GIB) * 2**30 / BYTES_PER_PIXEL))


def item_pixels(key: Key, downsample: int = 1) -> int:
    """Pixels one image of bucket `key` costs: encode `(op, H, W, 3)`: H·W; decode `(op, h, w)`: the
    output's h·w·f²."""
    op, *shape = key
    pixels = 1
    for side in shape[:2]:
        pixels *= cast(int, side)
    return pixels * downsample**2 if op == "decode" else pixels


def batch_limit(key: Key, max_batch_size: int, max_batch_pixels: int | None, downsample: int = 1) -> int:
    """Images of bucket `key` in one batch: `max_batch_size`, fewer where `max_batch_pixels` says so, at least 1."""
    if max_batch_pixels is None:
        return max_batch_size
    return max(1, min(max_batch_size, max_batch_pixels // max(1, item_pixels(key, downsample))))


# Batches are planned as if they took this much longer than the median batch says: batch times spread on
# a loaded host (the median is exceeded half the time), a request also needs time outside its batch (its
# image decoded before, its answer encoded after), and a planned batch that runs late fails every request
# in it at once. Admission and batch sizing both use it.
PLAN_HEADROOM = 1.25


class ServiceTime:
    """What one pixel of an op costs the model, from the batches run (the median of the last `window`),
    and so how long the work queued ahead of a request will take.

    Under load the batches are full, and a full batch costs less a pixel than a small one (the fixed
    cost of a call is shared): the estimate follows batches of at least half the limit once there are
    enough of them, so a queue is not judged by the small batches of a quiet server. The median, over at
    least `least` batches, keeps one stalled batch (a page fault storm, another process on the cores)
    from turning requests away."""

    def __init__(self, window: int = 16, least: int = 3) -> None:
        self.least = least
        self._seen: dict[tuple[str, bool], deque[float]] = {}  # (op, full) -> seconds a pixel, newest last
        self._window = window

    def observe(self, op: str, pixels: int, seconds: float, full: bool) -> None:
        if pixels > 0 and seconds > 0:
            self._seen.setdefault((op, full), deque(maxlen=self._window)).append(seconds / pixels)

    def per_pixel(self, op: str) -> float | None:
        """Seconds a pixel of `op` costs in a batch (None: no batch of `op` has run yet). Until `least`
        batches of one kind have run, the median of the few there are: a cold server's first batches are
        the ones most likely to outlast their deadlines, so one measured batch is better than none."""
        full, part = self._seen.get((op, True), ()), self._seen.get((op, False), ())
        for seen in (full, part):
            if len(seen) >= self.least:
                return float(np.median(seen))
        both = [*full, *part]
        return float(np.median(both)) if both else None


class PixelPool:
    """The pixels of the inference calls running at once, across every batcher that shares the pool.

    `acquire` waits (first come, first served, so a large batch is not overtaken for ever by small
    ones) until the pixels fit; a request above the whole capacity (one image above the limit, run
    alone) takes the whole pool."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"pixel pool capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, pixels: int) -> int:
        """Take `pixels` (at most the capacity) once they fit; returns what was taken, for `release`."""
        n = max(0, min(pixels, self.capacity))
        if not self._waiting and self.in_use + n <= self.capacity:
            self.in_use += n
            return n
        entry = (n, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]
        except BaseException:
            if entry[1].done() and not entry[1].cancelled():  # granted as the waiter was cancelled
                self.release(n)
            elif entry in self._waiting:
                self._waiting.remove(entry)
                self._wake()  # the head may have been what blocked the others
            raise
        return n

    def release(self, pixels: int) -> None:
        self.in_use -= pixels
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self.in_use + self._waiting[0][0] <= self.capacity:
            n, fut = self._waiting.popleft()
            if fut.done():  # its waiter was cancelled
                continue
            self.in_use += n
            fut.set_result(None)


@dataclass(eq=False)
class _Item:
    key: Key
    array: np.ndarray  # (n, *key[1:])
    future: asyncio.Future[np.ndarray]
    deadline: float  # time.monotonic()
    enqueued: float = field(default_factory=time.monotonic)
    queued: bool = True

    @property
    def n(self) -> int:
        return int(self.array.shape[0])


class Batcher:
    def __init__(
        self,
        model: str,
        run: RunFn,
        executor: Executor,
        metrics: Metrics,
        *,
        max_batch_size: int = 32,
        max_delay_s: float = 0.002,
        max_queue_images: int = 512,
        workers: int = 1,
        max_batch_pixels: int | None = None,
        downsample: int = 1,
        pixel_pool: PixelPool | None = None,
    ) -> None:
        """`max_batch_pixels`: pixels per call (None: no pixel limit); `downsample`: the model's f, by
        which decode counts its output pixels; `pixel_pool`: the pool shared with other batchers (None
        with a pixel limit: a pool of this batcher's own, which bounds its workers together)."""
        self.model = model
        self._run_fn = run
        self._executor = executor
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_images = max_queue_images
        self.max_batch_pixels = max_batch_pixels
        self.downsample = downsample
        if pixel_pool is None and max_batch_pixels is not None:
            pixel_pool = PixelPool(max_batch_pixels)
        self._pool = pixel_pool
        self._n_workers = workers
        self._buckets: dict[Key, deque[_Item]] = {}
        self._queued_images = 0
        self._queued_pixels: dict[str, int] = {}  # by op: the work waiting, for admission
        self._running_seconds: list[float] = []  # expected end (monotonic) of each batch running
        self.service_time = ServiceTime()
        self._waiters: set[asyncio.Future[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._running_batches = 0
        self._accepting = True

    # --- public ---

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(), name=f"batcher-{self.model}-{i}") for i in range(self._n_workers)]

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def workers(self) -> int:
        """Batches this model runs at the same time."""
        return self._n_workers

    @property
    def busy(self) -> bool:
        return self._queued_images > 0 or self._running_batches > 0

    def image_pixels(self, key: Key) -> int:
        return item_pixels(key, self.downsample)

    def batch_limit(self, key: Key) -> int:
        return batch_limit(key, self.max_batch_size, self.max_batch_pixels, self.downsample)

    async def submit(self, op: str, array: np.ndarray, deadline: float) -> np.ndarray:
        """Queue `array` (n, ...) and wait for its results (n, ...). Cancel the awaiting task to drop it."""
        if not self._accepting:
            raise ShuttingDown(f"model {self.model!r} is not taking new work")
        n = int(array.shape[0])
        if n > self.max_queue_images:
            self._metrics.rejected.labels(self.model, "too_large").inc()
            raise TooLarge(f"{n} images in one request; model {self.model!r} queues at most {self.max_queue_images}")
        if self._queued_images + n > self.max_queue_images:
            self._metrics.rejected.labels(self.model, "queue_full").inc()
            raise QueueFull(f"model {self.model!r} has {self._queued_images} images queued (limit {self.max_queue_images})")
        key: Key = (op, *array.shape[1:])
        self._admit(op, n * self.image_pixels(key), deadline)
        loop = asyncio.get_running_loop()
        limit = self.batch_limit(key)
        items = []
        for start in range(0, n, limit):
            fut: asyncio.Future[np.ndarray] = loop.create_future()
            item = _Item(key, array[start : start + limit], fut, deadline)
            fut.add_done_callback(lambda f, it=item: self._on_done(it))  # type: ignore[misc]
            items.append(item)
            self._buckets.setdefault(key, deque()).append(item)
            self._queued_images += item.n
            self._queued_pixels[op] = self._queued_pixels.get(op, 0) + item.n * self.image_pixels(key)
        self._set_depth()
        self._notify()
        try:
            results = await asyncio.gather(*(it.future for it in items))
        except BaseException:
            for it in items:
                it.future.cancel()
            raise
        return results[0] if len(results) == 1 else np.concatenate(results)

    def drain_seconds(self, extra: tuple[str, int] | None = None) -> float | None:
        """How long the work queued and running would keep this model's workers busy, with `extra` (an op
        and its pixels) added; None while no batch of that op has run to say what a pixel costs. An op
        queued whose cost is not known yet counts for nothing."""
        if extra is not None and self.service_time.per_pixel(extra[0]) is None:
            return None
        now = time.monotonic()
        work = sum(max(0.0, end - now) for end in self._running_seconds)
        queued = dict(self._queued_pixels)
        if extra is not None:
            queued[extra[0]] = queued.get(extra[0], 0) + extra[1]
        for op, pixels in queued.items():
            work += pixels * (self.service_time.per_pixel(op) or 0.0) * PLAN_HEADROOM
        return work / self._n_workers

    def _admit(self, op: str, pixels: int, deadline: float) -> None:
        """Refuse now (`Overloaded`) a request that the queue ahead of it makes finish after `deadline`.
        On an idle model (nothing queued or running) every request is admitted: nothing ahead can make it
        late, and running it is what keeps the estimate honest (were a stalled batch's time to refuse all
        that follows, nothing would run again to correct it)."""
        if self._queued_images == 0 and self._running_batches == 0:
            return
        wait = self.drain_seconds((op, pixels))
        if wait is None:
            return
        now = time.monotonic()
        if now + wait + self.max_delay_s > deadline:
            self._metrics.rejected.labels(self.model, "overloaded").inc()
            ahead = self.drain_seconds() or 0.0
            raise Overloaded(
                f"model {self.model!r} has {self._queued_images} images queued: this request would finish in about "
                f"{wait:.2f} s, after its deadline ({max(0.0, deadline - now):.2f} s from now); retry later",
                retry_after_s=max(1.0, ahead),
            )

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Take no new work; let queued and running batches finish (up to the timeout); then stop."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Take every item out of the queue before failing its future, so that the done-callbacks
        # (which run later) find nothing to remove.
        left = [item for bucket in self._buckets.values() for item in bucket]
        self._buckets.clear()
        for item in left:
            item.queued = False
            self._queued_images -= item.n
        self._queued_pixels.clear()
        self._set_depth()
        for item in left:
            if not item.future.done():
                item.future.set_exception(ShuttingDown(f"model {self.model!r} stopped"))

    # --- queue bookkeeping ---

    def _on_done(self, item: _Item) -> None:
        """A future finished while its item was still queued (cancelled by its client): drop the item now."""
        if item.queued:
            bucket = self._buckets.get(item.key)
            if bucket is not None and item in bucket:
                bucket.remove(item)
            self._dequeue(item)
            self._metrics.rejected.labels(self.model, "cancelled").inc()

    def _dequeue(self, item: _Item) -> None:
        item.queued = False
        self._queued_images -= item.n
        op = str(item.key[0])
        self._queued_pixels[op] = self._queued_pixels.get(op, 0) - item.n * self.image_pixels(item.key)
        if not self._buckets.get(item.key, True):
            del self._buckets[item.key]
        self._set_depth()

    def _set_depth(self) -> None:
        self._metrics.queue_depth.labels(self.model).set(self._queued_images)

    def _notify(self) -> None:
        for w in self._waiters:
            if not w.done():
                w.set_result(None)
        self._waiters.clear()

    async def _wait_for_arrival(self, timeout: float | None) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiters.discard(fut)

    def _bucket_images(self, key: Key) -> int:
        return sum(it.n for it in self._buckets.get(key, ()))

    # --- the worker ---

    async def _worker(self) -> None:
        while True:
            try:
                await self._next_batch()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not silently stop the model's batching
                log.exception("batcher worker error; continuing", extra={"model": self.model})
                await asyncio.sleep(0.01)

    async def _next_batch(self) -> None:
        while not self._buckets:
            await self._wait_for_arrival(None)
        # Oldest head first, so no shape waits behind a busy one for ever.
        key = min(self._buckets, key=lambda k: self._buckets[k][0].enqueued)
        head = self._buckets[key][0]
        limit = self.batch_limit(key)
        while self._bucket_images(key) < limit and key in self._buckets:
            remaining = head.enqueued + self.max_delay_s - time.monotonic()
            if remaining <= 0:
                break
            await self._wait_for_arrival(remaining)
        batch = self._take(key)
        if batch:
            await self._run(key, batch)

    def _take(self, key: Key) -> list[_Item]:
        """Pop up to `batch_limit(key)` images of `key` (at least one item), failing items already
        past their deadline. Once what a pixel costs is known, a batch also stops growing where it would
        end after the earliest deadline of the items in it: every item of a batch finishes when the batch
        does, so one more image would make the earlier items late (the rest wait for the next batch)."""
        bucket = self._buckets.get(key)
        batch: list[_Item] = []
        size = 0
        limit = self.batch_limit(key)
        now = time.monotonic()
        cost = self.service_time.per_pixel(str(key[0]))
        image_seconds = 0.0 if cost is None else cost * self.image_pixels(key) * PLAN_HEADROOM
        earliest = math.inf  # the earliest deadline in the batch so far
        while bucket and (size == 0 or size + bucket[0].n <= limit):
            item = bucket[0]
            if batch and not item.future.done() and now + image_seconds * (size + item.n) > min(earliest, item.deadline):
                break  # it waits at the head of the queue for the next batch
            bucket.popleft()
            self._dequeue(item)
            if item.future.done():  # cancelled; its done-callback has not run yet
                self._metrics.rejected.labels(self.model, "cancelled").inc()
                continue
            # not even alone, now: failed where others wait for the model (alone on an idle one it runs,
            # as in `_admit`, which keeps the estimate honest)
            others = bool(batch) or self._queued_images > 0 or self._running_batches > 0
            if item.deadline <= now or (others and item.deadline <= now + image_seconds * item.n):
                self._metrics.rejected.labels(self.model, "deadline").inc()
                reason = "passed while queued" if item.deadline <= now else "would pass before its batch could finish"
                item.future.set_exception(DeadlineExceeded(f"deadline {reason}"))
                continue
            batch.append(item)
            size += item.n
            earliest = min(earliest, item.deadline)
        return batch

    async def _run(self, key: Key, batch: list[_Item]) -> None:
        op = str(key[0])
        self._running_batches += 1
        granted = 0
        try:
            if self._pool is not None:
                # wait for the pixels: other calls (this model's other workers, other models) may hold them
                granted = await self._pool.acquire(sum(item.n for item in batch) * self.image_pixels(key))
                batch = [item for item in batch if not item.future.done()]  # left (or expired) while waiting
                if not batch:
                    return
            start = time.monotonic()
            for item in batch:
                self._metrics.queue_seconds.labels(self.model, op).observe(start - item.enqueued)
            arrays = [item.array for item in batch]
            pixels = sum(item.n for item in batch) * self.image_pixels(key)
            cost = self.service_time.per_pixel(op)
            expected_end = start + (0.0 if cost is None else cost * pixels)
            self._running_seconds.append(expected_end)
            try:
                out = await asyncio.get_running_loop().run_in_executor(self._executor, self._call, op, arrays)
            finally:
                self._running_seconds.remove(expected_end)
            full = sum(item.n for item in batch) * 2 >= self.batch_limit(key)
            self.service_time.observe(op, pixels, time.monotonic() - start, full)
        except asyncio.CancelledError:
            # The worker is being stopped while this batch runs (the thread goes on; its result is
            # dropped): answer the batch's requests now rather than at their deadlines.
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(ShuttingDown(f"model {self.model!r} stopped while this batch ran"))
            raise
        except Exception as exc:
            self._metrics.batch_failures.labels(self.model, op).inc()
            log.error(
                "inference failed for a batch",
                extra={"model": self.model, "op": op, "batch": len(batch), "error": repr(exc)},
                exc_info=exc,
            )
            problem = inference_problem(exc)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(problem)
            return
        finally:
            self._running_batches -= 1
            if granted and self._pool is not None:
                self._pool.release(granted)
        size = sum(item.n for item in batch)
        self._metrics.inference_seconds.labels(self.model, op).observe(time.monotonic() - start)
        self._metrics.batch_size.labels(self.model, op).observe(size)
        offset = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(out[offset : offset + item.n])
            offset += item.n

    def _call(self, op: str, arrays: Sequence[np.ndarray]) -> np.ndarray:
        x = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        y = self._run_fn(op, x)
        if y.shape[0] != x.shape[0]:
            raise RuntimeError(f"runtime returned {y.shape[0]} results for {x.shape[0]} inputs")
        return y
