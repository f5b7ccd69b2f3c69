"""The inference process of a split server (`front_workers` > 0).

It owns what must be one per GPU: the model repository (load, warm, reload with leases), every
model's runtime and dynamic batcher, and the pixel pool. The front processes (`front.py`) do HTTP,
validation, image decoding and response encoding, and send it decoded arrays through shared memory
(`ipc.py`) over one Unix socket each; because every request of every front reaches this one batcher,
batches fill as they do in a single-process server.

Messages from a front: `hello` (its slab), `infer`, `cancel` (a request's client went away), `call`
(reload, snapshot, metrics) and `families` (its metrics, answering `collect`). To a front: `rep` (one
per infer or call), `snap` (models and readiness, after every change) and `collect`.

An `infer` carries every request a front queued in one turn of its event loop for one model, op, item
shape and dtype whose arrays are in its slab: `{"ids": [...], "model", "op", "deadline", "xr": [input
regions], "yr": [answer regions]}` (a request whose array travels inline goes alone: `"x"` instead of
`"xr"`/`"yr"`). The front caps a group at what one batch takes (`max_batch_size`, `max_batch_pixels`)
and at `max_queue_images`, so a group is never `TooLarge` where its requests alone would not be. Every
request crosses this process's one event loop, and its per-message Python work (unpickling, a task, a
lease, the batcher's bookkeeping, a reply) is paid per message, whatever the message holds; a group
pays it once: one task, one lease, one `submit` of its requests' arrays concatenated, and one
`rep` `{"ids": [...], "ok": True}` (with `"ys"`: {id: answer} for answers that do not fit their
region), or one error for all.
What one `submit` means for a group: `QueueFull` refuses all of it (the queue bound counts images, so a
group can be refused where some of its requests alone would have been queued), and the batcher drops
it at the latest deadline of its requests, not the earliest: each front times out its own request
(and cancels it), while dropping the group at the earliest would fail the others with it.
`cancel` names one request; the group's task is cancelled (its item leaves the queue) once every
request of it is cancelled, and the others are answered as if nothing happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from models.core.errors import Problem, inference_problem

from ..metrics import Metrics
from ..repository import Loader, ModelRepository
from ..settings import Settings
from . import ipc

log = logging.getLogger("vqtok.inference")


def error_fields(exc: BaseException) -> dict[str, Any]:
    """An exception as a reply the front turns back into the same problem (`front.raise_error`): the
    Problem's class name, detail, retry and body members; anything else is the inference failure it stands for."""
    problem: Problem = exc if isinstance(exc, Problem) else inference_problem(exc)
    return {"err": type(problem).__name__, "msg": problem.detail, "retry_after_s": problem.retry_after_s, "extra": problem.extra}


@dataclass(eq=False)
class _Work:
    """The task serving one `infer` (one or more requests) or one `call`."""

    task: asyncio.Task[None]
    live: set[int]  # ids of its requests that the front has not cancelled


@dataclass(eq=False)
class _Front:
    writer: asyncio.StreamWriter
    shm: Any = None
    pid: int = 0
    work: dict[int, _Work] = field(default_factory=dict)  # by request id
    _outbox: list[bytes] = field(default_factory=list)

    def send(self, msg: dict[str, Any]) -> None:
        """Queue a message; what is queued in one turn of the event loop leaves in one write. A batch
        answers its requests in the same turn, so they share one send() instead of one each: a socket
        write per reply would be the largest cost of this loop, which every request goes through."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self.flush)
        self._outbox.append(ipc.pack(msg))

    def flush(self) -> None:
        data, self._outbox = b"".join(self._outbox), []
        if data and not self.writer.is_closing():
            self.writer.write(data)


class InferenceProcess:
    def __init__(self, settings: Settings, socket_path: str, loader: Loader | None = None) -> None:
        """`loader` replaces `models.runtime.load_runtime` (tests wrap the real runtime)."""
        self.settings = settings
        self.socket_path = socket_path
        self.metrics = Metrics()
        self.repo = ModelRepository(settings, self.metrics, loader)
        self.fronts: set[_Front] = set()
        self._collects: dict[int, asyncio.Future[list[Metric]]] = {}
        self._ids = itertools.count(1)
        self._stop = asyncio.Event()

    # --- lifecycle ---

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload(None)))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        server = await asyncio.start_unix_server(self._serve_front, path=self.socket_path, limit=2**20)
        log.info("inference process listening", extra={"socket": self.socket_path, "pid": os.getpid()})
        loading = loop.create_task(self._load())
        await self._stop.wait()
        log.info("inference process stopping")
        server.close()
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        await self.repo.close()  # drains what is queued and running (shutdown_timeout_s)
        for front in list(self.fronts):
            front.flush()  # the last replies, queued in this turn of the loop
            front.writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def stop(self) -> None:
        """Make `run` stop: the models drain their queues, then every front is let go."""
        self._stop.set()

    async def _load(self) -> None:
        await self.repo.load_all()
        self.broadcast()

    async def _reload(self, model: str | None) -> list[dict[str, Any]]:
        try:
            return await self.repo.reload(model)
        finally:
            self.broadcast()

    # --- snapshots ---

    def snapshot(self) -> dict[str, Any]:
        models = []
        for e in self.repo.entries():
            served, s = None, self.repo.live(e.name)
            if s is not None:
                rt = s.runtime
                served = {
                    "info": rt.info,
                    "device": rt.device,
                    "runtime_name": rt.runtime_name,
                    "providers": list(rt.providers),
                    "max_batch_size": s.batcher.max_batch_size,
                    "batch_workers": s.batcher.workers,
                    "max_batch_pixels": s.batcher.max_batch_pixels,
                    "max_queue_images": s.batcher.max_queue_images,
                    "queued_images": s.batcher.queued_images,
                    "loaded_at": s.loaded_at,
                }
            models.append({"name": e.name, "path": str(e.path), "state": e.state, "error": e.error, "served": served})
        return {"t": "snap", "loaded": self.repo.loaded, "models": models, "fronts": len(self.fronts)}

    def broadcast(self) -> None:
        snap = self.snapshot()
        for front in list(self.fronts):
            front.send(snap)

    # --- one front ---

    async def _serve_front(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        front = _Front(writer)
        try:
            hello = await ipc.read_msg(reader)
            front.pid = int(hello.get("pid", 0))
            if hello.get("shm"):
                front.shm = ipc.attach(hello["shm"])
            self.fronts.add(front)
            log.info("front connected", extra={"front_pid": front.pid, "fronts": len(self.fronts)})
            self.broadcast()
            while True:
                msg = await ipc.read_msg(reader)
                kind = msg["t"]
                if kind == "infer":
                    self._start(front, msg["ids"], self._infer(front, msg))
                elif kind == "cancel":
                    work = front.work.get(msg["id"])
                    if work is not None:
                        work.live.discard(msg["id"])
                        if not work.live:  # until every request of it is cancelled, the others need its answer
                            work.task.cancel()
                elif kind == "call":
                    self._start(front, [msg["id"]], self._call(front, msg))
                elif kind == "families":
                    fut = self._collects.get(msg["id"])
                    if fut is not None and not fut.done():
                        fut.set_result(msg["families"])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("front connection failed", extra={"front_pid": front.pid})
        finally:
            self.fronts.discard(front)
            tasks = {work.task for work in front.work.values()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if front.shm is not None:
                ipc.detach(front.shm)
            writer.close()
            log.info("front disconnected", extra={"front_pid": front.pid, "fronts": len(self.fronts)})
            self.broadcast()

    def _start(self, front: _Front, ids: list[int], work: Coroutine[Any, Any, None]) -> None:
        entry = _Work(asyncio.create_task(work), set(ids))
        for rid in ids:
            front.work[rid] = entry

    async def _infer(self, front: _Front, msg: dict[str, Any]) -> None:
        ids: list[int] = msg["ids"]
        reply: dict[str, Any] = {"t": "rep", "ids": ids}
        try:
            inputs: list[ipc.Region] | None = msg.get("xr")
            if inputs is None:
                x = msg["x"]
                counts = [int(x.shape[0])]
            else:
                x = inputs[0].view(front.shm.buf) if len(inputs) == 1 else np.concatenate([r.view(front.shm.buf) for r in inputs])
                counts = [r.shape[0] for r in inputs]
            async with self.repo.lease(msg["model"]) as served:
                self.metrics.infer_message_requests.labels(served.name, msg["op"]).observe(len(ids))
                y = await served.batcher.submit(msg["op"], x, msg["deadline"])
            del x
            reply["ok"] = True
            inline = _write_answers(front.shm, ids, counts, msg.get("yr"), y)
            if inline:
                reply["ys"] = inline
        except asyncio.CancelledError:
            # Every request of it was cancelled (or its front is gone); its front frees the regions on
            # this reply. Were the item already in a running batch, that batch may still read the input
            # regions (the answer regions are never written: that happens above, after submit
            # returned); what a reused input region could change is the cancelled requests' own
            # results, which nobody reads, never another image's (every image is its own sample).
            reply |= {"err": "cancelled", "msg": "cancelled"}
        except Exception as exc:
            reply |= error_fields(exc)
        for rid in ids:
            front.work.pop(rid, None)
        front.send(reply)

    async def _call(self, front: _Front, msg: dict[str, Any]) -> None:
        rid, fn = msg["id"], msg["fn"]
        reply: dict[str, Any]
        try:
            if fn == "reload":
                value: Any = await self._reload(msg.get("model"))
            elif fn == "snapshot":
                value = self.snapshot()
            elif fn == "metrics":
                value = await self.exposition()
            else:
                raise ValueError(f"unknown call {fn!r}")
            reply = {"t": "rep", "id": rid, "ok": True, "value": value}
        except asyncio.CancelledError:
            reply = {"t": "rep", "id": rid, "err": "cancelled", "msg": "cancelled"}
        except Exception as exc:
            reply = {"t": "rep", "id": rid, **error_fields(exc)}
        front.work.pop(rid, None)
        front.send(reply)

    # --- metrics: this process's registry and every front's, summed ---

    async def exposition(self, timeout: float = 2.0) -> bytes:
        loop = asyncio.get_running_loop()
        waits = []
        for front in list(self.fronts):
            cid = next(self._ids)
            fut: asyncio.Future[list[Metric]] = loop.create_future()
            self._collects[cid] = fut
            waits.append((cid, fut))
            front.send({"t": "collect", "id": cid})
        families: list[list[Metric]] = [list(self.metrics.registry.collect())]
        if waits:
            await asyncio.wait([f for _, f in waits], timeout=timeout)
        for cid, fut in waits:
            self._collects.pop(cid, None)
            if fut.done() and not fut.cancelled():
                families.append(fut.result())
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(families))  # type: ignore[arg-type]
        return generate_latest(registry)


def _write_answers(shm: Any, ids: list[int], counts: list[int], outs: list[ipc.Region] | None, y: np.ndarray) -> dict[int, np.ndarray]:
    """Each request's rows of `y` (`counts[i]` of them, in order) into its answer region; returns, by
    id, the answers to send inline instead: no region (the input came inline), or not the shape the
    front expected (a reload changed the model)."""
    inline: dict[int, np.ndarray] = {}
    start = 0
    for i, (rid, n) in enumerate(zip(ids, counts, strict=True)):
        answer = y[start : start + n]
        start += n
        out = outs[i] if outs is not None else None
        if out is not None and answer.shape == out.shape and answer.dtype == np.dtype(out.dtype):
            out.view(shm.buf)[...] = answer
        else:
            inline[rid] = np.ascontiguousarray(answer)
    return inline


class _Merged:
    """Prometheus families from several processes, same-labelled samples summed (`_created`: the earliest)."""

    def __init__(self, sources: list[list[Metric]]) -> None:
        self.sources = sources

    def collect(self) -> list[Metric]:
        merged: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for source in self.sources:
            for m in source:
                if m.name not in merged:
                    merged[m.name] = Metric(m.name, m.documentation, m.type, m.unit)
                    values[m.name] = {}
                vals = values[m.name]
                for s in m.samples:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    if key not in vals:
                        vals[key] = s.value
                    elif s.name.endswith("_created"):
                        vals[key] = min(vals[key], s.value)
                    else:
                        vals[key] += s.value
        for name, metric in merged.items():
            for (sample, labels), value in values[name].items():
                metric.add_sample(sample, dict(labels), value)
        return list(merged.values())


def main(settings: Settings, socket_path: str) -> None:
    Path(socket_path).parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(InferenceProcess(settings, socket_path).run())
