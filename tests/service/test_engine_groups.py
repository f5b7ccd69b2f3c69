"""A front's infer requests of one event-loop turn reach the inference process as one grouped message.

The inference process (`InferenceProcess`) and a front's side (`RemoteRepository` with its slab) run here in
one event loop over a real Unix socket, with the real tiny model: requests started in one turn of the
loop are grouped deterministically, and a gated runtime holds a batch for the cancellation cases.
Every image is different, and each request's tokens are checked against the runtime's own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.core.errors import QueueFull
from models.runtime.onnx import ModelRuntime
from service.metrics import Metrics
from service.multiproc import ipc
from service.multiproc.front import InferenceGone, RemoteRepository
from service.multiproc.inference import InferenceProcess
from service.settings import Settings

from .conftest import Faults, cpu_settings

SLAB = 1 << 20
# a 32×32 encode request of fsq4 (f=4) holds 3,072 input bytes and 256 answer bytes: 3,328 of a slab
REQUEST_BYTES = 32 * 32 * 3 + 8 * 8 * 4


def _settings(model_repo: Path, **overrides: Any) -> Settings:
    return cpu_settings(model_repo, **({"default_model": "fsq4", "front_workers": 1, "max_batch_delay_ms": 5} | overrides))


class Split:
    """An inference process and one front's side of it, in this event loop; `groups` records each
    infer message the inference process received: the images of each of its requests."""

    def __init__(self, engine: InferenceProcess, front: RemoteRepository) -> None:
        self.engine, self.front = engine, front
        self.groups: list[list[int]] = []
        infer = engine._infer

        async def spy(front: Any, msg: dict[str, Any]) -> None:
            self.groups.append([r.shape[0] for r in msg["xr"]] if "xr" in msg else [int(msg["x"].shape[0])])
            await infer(front, msg)

        engine._infer = spy  # type: ignore[method-assign]

    @property
    def slab(self) -> ipc.Slab:
        assert self.front.client.slab is not None
        return self.front.client.slab

    async def submit(self, op: str, array: np.ndarray, timeout: float = 30.0) -> np.ndarray:
        """As a route does (`routes.common.with_deadline`): the front times its request out itself."""
        async with self.front.lease("fsq4") as served:
            return await asyncio.wait_for(served.batcher.submit(op, array, time.monotonic() + timeout), timeout)

    def started(self, requests: list[tuple[str, np.ndarray]]) -> list[asyncio.Task[np.ndarray]]:
        """Tasks for `requests`, all starting in the next turn of the loop (so they form groups there)."""
        return [asyncio.ensure_future(self.submit(op, x)) for op, x in requests]


@contextlib.asynccontextmanager
async def split(settings: Settings, tmp_path: Path, loader: Callable[..., Any] | None = None, slab: int = SLAB) -> AsyncIterator[Split]:
    engine = InferenceProcess(settings, str(tmp_path / "inference.sock"), loader)
    running = asyncio.create_task(engine.run())
    front = RemoteRepository(settings, Metrics(), engine.socket_path, ipc.Slab(f"vqtok-test{os.getpid()}-groups", slab))
    connecting = asyncio.create_task(front.load_all())
    try:
        deadline = time.monotonic() + 60
        while front.not_ready_reason() is not None:
            assert time.monotonic() < deadline, front.not_ready_reason()
            assert not running.done(), running
            await asyncio.sleep(0.02)
        yield Split(engine, front)
    finally:
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        engine.stop()
        try:
            await running
        finally:  # the slab goes even when the engine failed: no segment left in /dev/shm
            # one process plays both sides here: the inference process's `ipc.attach` took the slab off this
            # process's resource tracker, which the front's unlink would then find missing
            resource_tracker.register(front.client.slab.shm._name, "shared_memory")  # type: ignore[union-attr]
            await front.close()


@pytest.fixture(scope="module")
def runtime(model_repo: Path) -> ModelRuntime:
    return ModelRuntime.load(model_repo / "fsq4", device="cpu")


def _images(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """`n` different images, each (1, size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8) for _ in range(n)]


def _tokens(runtime: ModelRuntime, x: np.ndarray) -> np.ndarray:
    return np.concatenate([runtime.encode(im[None]) for im in x])  # one image at a time: no batch in the reference


async def _wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_requests_of_one_turn_go_as_one_message_and_each_gets_its_own_tokens(
    model_repo: Path, tmp_path: Path, runtime: ModelRuntime
) -> None:
    # one-image requests and a three-image one among them: the answers are sliced by each request's own count
    xs = _images(12)
    xs.insert(5, np.concatenate(_images(3, seed=1)))

    async def run() -> None:
        async with split(_settings(model_repo), tmp_path) as s:
            got = await asyncio.gather(*s.started([("encode", x) for x in xs]))
            assert s.groups == [[1] * 5 + [3] + [1] * 7]
            for x, y in zip(xs, got, strict=True):
                np.testing.assert_array_equal(y, _tokens(runtime, x))
            assert s.slab.free_bytes == s.slab.size
            reg = s.engine.metrics.registry
            labels = {"model": "fsq4", "op": "encode"}
            assert reg.get_sample_value("vqtok_infer_message_requests_count", labels) == 1
            assert reg.get_sample_value("vqtok_infer_message_requests_sum", labels) == 13
            assert reg.get_sample_value("vqtok_batch_size_sum", labels) == 15  # one submit of 15 images, batched as one

    asyncio.run(run())


@pytest.mark.parametrize(
    ("limits", "sizes", "groups"),
    [
        ({"max_batch_size": 4}, [1] * 10, [[1] * 4, [1] * 4, [1] * 2]),
        # 3 images of 32² per batch
        ({"max_batch_pixels": 3 * 32 * 32}, [1] * 7, [[1] * 3, [1] * 3, [1]]),
        # the queue holds 2 images: a group of 3 would be TooLarge where its requests alone are not (the
        # requests after the first two find the queue full, grouped or not)
        ({"max_queue_images": 2, "max_images_per_request": 2}, [1, 1, 2, 1], [[1, 1], [2], [1]]),
        # a request above the limit goes alone (the batcher splits it, as it does without groups)
        ({"max_batch_size": 4}, [1, 6, 1, 3], [[1], [6], [1, 3]]),
    ],
)
def test_a_group_holds_no_more_images_than_one_batch_or_the_queue_takes(
    model_repo: Path, tmp_path: Path, runtime: ModelRuntime, limits: dict[str, int], sizes: list[int], groups: list[list[int]]
) -> None:
    xs = [np.concatenate(_images(n, seed=k)) for k, n in enumerate(sizes)]

    async def run() -> None:
        async with split(_settings(model_repo, **limits), tmp_path) as s:
            got = await asyncio.gather(*s.started([("encode", x) for x in xs]), return_exceptions=True)
            assert s.groups == groups
            full = [isinstance(y, QueueFull) for y in got]
            assert not any(full[:2]) and any(full) == ("max_queue_images" in limits), got
            for x, y in zip(xs, got, strict=True):
                if not isinstance(y, QueueFull):
                    np.testing.assert_array_equal(y, _tokens(runtime, x))

    asyncio.run(run())


def test_shapes_and_ops_form_separate_groups_and_inline_requests_go_alone(model_repo: Path, tmp_path: Path, runtime: ModelRuntime) -> None:
    small, large = _images(3, 16, seed=1), _images(3, 32, seed=2)
    grids = [np.random.default_rng(k).integers(0, 1000, (1, 8, 8), dtype=np.int32) for k in range(2)]
    requests = [("encode", small[0]), ("encode", large[0]), ("decode", grids[0]), ("encode", small[1])]
    requests += [("encode", large[1]), ("decode", grids[1]), ("encode", small[2]), ("encode", large[2])]

    async def run() -> None:
        async with split(_settings(model_repo), tmp_path) as s:
            got = await asyncio.gather(*s.started(requests))
            # in the order each group was first joined
            assert sorted(s.groups) == sorted([[1, 1, 1], [1, 1, 1], [1, 1]]) and len(s.groups) == 3
            for (op, x), y in zip(requests, got, strict=True):
                want = _tokens(runtime, x) if op == "encode" else runtime.decode(x)
                np.testing.assert_array_equal(y, want)

    asyncio.run(run())

    # a slab with room for two requests: those two form a group, the others travel inline, one message each
    xs = _images(5)

    async def tight() -> None:
        async with split(_settings(model_repo), tmp_path, slab=2 * REQUEST_BYTES) as s:
            got = await asyncio.gather(*s.started([("encode", x) for x in xs]))
            assert s.groups == [[1], [1], [1], [1, 1]]  # the group leaves at the end of the turn
            for x, y in zip(xs, got, strict=True):
                np.testing.assert_array_equal(y, _tokens(runtime, x))
            assert s.slab.free_bytes == s.slab.size

    asyncio.run(tight())


def test_a_cancelled_request_leaves_its_group_answered_and_its_regions_held_until_the_reply(
    model_repo: Path, tmp_path: Path, runtime: ModelRuntime, faults: Faults
) -> None:
    xs = _images(4)

    async def run() -> None:
        async with split(_settings(model_repo, batch_workers=1), tmp_path, loader=faults.loader) as s:
            faults.gate.clear()
            # the group is running in the (gated) model when one of its requests is cancelled
            tasks = s.started([("encode", x) for x in xs])
            await _wait_until(faults.entered.is_set)
            tasks[1].cancel()
            await asyncio.sleep(0.2)  # the cancel reaches the inference process, which must not drop the others
            assert s.slab.size - s.slab.free_bytes == 4 * REQUEST_BYTES  # the model may still write its answer
            faults.gate.set()
            got = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(got[1], asyncio.CancelledError)
            for i in (0, 2, 3):
                np.testing.assert_array_equal(got[i], _tokens(runtime, xs[i]))
            await _wait_until(lambda: s.slab.free_bytes == s.slab.size)  # freed when the group's reply came
            assert faults.batches == [4]

            # a queued group, behind a running batch: cancelling some of its requests keeps it queued and
            # answered; cancelling all of them takes it out of the queue (it never runs)
            faults.gate.clear()
            faults.entered.clear()
            blocker = asyncio.ensure_future(s.submit("encode", xs[0]))
            await _wait_until(faults.entered.is_set)
            kept = s.started([("encode", x) for x in xs[:3]])
            await asyncio.sleep(0)  # they join one group in this turn...
            dropped = s.started([("encode", np.concatenate([x, x])) for x in xs[:3]])  # ...these a second one
            await asyncio.sleep(0.2)
            kept[0].cancel()
            for t in dropped:
                t.cancel()
            await asyncio.sleep(0.2)
            queued = s.engine.metrics.registry.get_sample_value("vqtok_queue_depth", {"model": "fsq4"})
            assert queued == 3  # the kept group's three images; the dropped group's six left the queue
            faults.gate.set()
            got = await asyncio.gather(blocker, *kept, *dropped, return_exceptions=True)
            assert [type(g) for g in got[1:]] == [asyncio.CancelledError, np.ndarray, np.ndarray] + [asyncio.CancelledError] * 3
            for i in (1, 2):
                np.testing.assert_array_equal(got[1 + i], _tokens(runtime, xs[i]))
            assert faults.batches[1:] == [1, 3]  # the blocker, then the kept group; the dropped group never ran
            assert s.groups[-2:] == [[1, 1, 1], [2, 2, 2]]
            await _wait_until(lambda: s.slab.free_bytes == s.slab.size)
            reg = s.engine.metrics.registry
            assert reg.get_sample_value("vqtok_rejected_total", {"model": "fsq4", "reason": "cancelled"}) == 1

    asyncio.run(run())


def test_a_request_with_a_short_deadline_times_out_alone(model_repo: Path, tmp_path: Path, runtime: ModelRuntime, faults: Faults) -> None:
    xs = _images(3)

    async def run() -> None:
        async with split(_settings(model_repo, batch_workers=1), tmp_path, loader=faults.loader) as s:
            faults.gate.clear()
            blocker = asyncio.ensure_future(s.submit("encode", xs[0]))
            await _wait_until(faults.entered.is_set)
            # one group, queued behind the running batch; its first request's deadline passes there
            group = [asyncio.ensure_future(s.submit("encode", x, timeout=0.2 if i == 0 else 30.0)) for i, x in enumerate(xs)]
            await asyncio.sleep(0.5)
            faults.gate.set()
            got = await asyncio.gather(blocker, *group, return_exceptions=True)
            assert s.groups[-1] == [1, 1, 1]
            assert isinstance(got[1], asyncio.TimeoutError)
            for i in (1, 2):
                np.testing.assert_array_equal(got[1 + i], _tokens(runtime, xs[i]))
            await _wait_until(lambda: s.slab.free_bytes == s.slab.size)

    asyncio.run(run())


def test_losing_the_inference_process_fails_every_request_of_a_group_and_frees_the_slab(
    model_repo: Path, tmp_path: Path, faults: Faults
) -> None:
    xs = _images(3)

    async def run() -> None:
        async with split(_settings(model_repo), tmp_path, loader=faults.loader) as s:
            faults.gate.clear()
            tasks = s.started([("encode", x) for x in xs])
            await _wait_until(faults.entered.is_set)
            tasks[0].cancel()
            await asyncio.sleep(0.1)
            writer = s.front.client._writer
            assert writer is not None
            writer.transport.abort()  # the connection goes, as when the inference process dies
            got = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(got[0], asyncio.CancelledError)
            assert all(isinstance(g, InferenceGone) for g in got[1:]), got
            assert s.slab.free_bytes == s.slab.size
            faults.gate.set()

    asyncio.run(run())
