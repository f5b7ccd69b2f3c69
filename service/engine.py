"""The inference process of a split server (`front_workers` > 0).

It owns what must be one per GPU: the model repository (load, warm, reload with leases), every
model's runtime and dynamic batcher, and the pixel pool. The front processes (`remote.py`) do HTTP,
validation, image decoding and response encoding, and send it decoded arrays through shared memory
(`ipc.py`) over one Unix socket each; because every request of every front reaches this one batcher,
batches fill as they do in a single-process server.

Messages from a front: `hello` (its slab), `infer` (model, op, input region or inline array, answer
region, deadline), `cancel` (its client went away: the item leaves the queue), `call` (reload,
snapshot, metrics) and `families` (its metrics, answering `collect`). To a front: `rep` (one per
infer or call), `snap` (models and readiness, after every change) and `collect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from . import ipc
from .batcher import BatchDeadlineExceeded, BatchFailed, QueueFull, ShuttingDown, TooLarge
from .metrics import Metrics
from .repository import ModelNotReady, ModelRepository, UnknownModel
from .runtime import InvalidInputError
from .settings import Settings

log = logging.getLogger("vqtok.engine")

_PASSED = (QueueFull, TooLarge, ShuttingDown, BatchDeadlineExceeded, UnknownModel, ModelNotReady)


def error_fields(exc: BaseException) -> dict[str, Any]:
    """An exception as a reply the front turns back into the same exception (`remote.raise_error`)."""
    if isinstance(exc, BatchFailed):
        cause = exc.cause
        kind = "invalid" if isinstance(cause, InvalidInputError) else "memory" if isinstance(cause, MemoryError) else "other"
        return {"err": "BatchFailed", "msg": str(cause), "kind": kind}
    for cls in _PASSED:
        if isinstance(exc, cls):
            return {"err": cls.__name__, "msg": str(exc)}
    return {"err": "BatchFailed", "msg": f"{type(exc).__name__}: {exc}", "kind": "other"}


@dataclass(eq=False)
class _Front:
    writer: asyncio.StreamWriter
    shm: Any = None
    pid: int = 0
    tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    _outbox: list[bytes] = field(default_factory=list)

    def send(self, msg: dict[str, Any]) -> None:
        """Queue a message; what is queued in one turn of the event loop leaves in one write. A batch
        answers its requests in the same turn, so they share one send() instead of one each: the
        per-reply socket write was the largest cost of this loop, which every request goes through
        (a third of its busy time, profiled on the CPU)."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self.flush)
        self._outbox.append(ipc.pack(msg))

    def flush(self) -> None:
        data, self._outbox = b"".join(self._outbox), []
        if data and not self.writer.is_closing():
            self.writer.write(data)


class Engine:
    def __init__(self, settings: Settings, socket_path: str) -> None:
        self.settings = settings
        self.socket_path = socket_path
        self.metrics = Metrics()
        self.repo = ModelRepository(settings, self.metrics)
        self.fronts: set[_Front] = set()
        self._collects: dict[int, asyncio.Future[list[Metric]]] = {}
        self._ids = itertools.count(1)
        self._stop = asyncio.Event()

    # --- lifecycle ---

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
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
            served = None
            if e.served is not None:
                s, rt = e.served, e.served.runtime
                served = {
                    "info": rt.info,
                    "device": str(getattr(rt, "device", "")),
                    "runtime_name": str(getattr(rt, "runtime_name", "")),
                    "providers": list(getattr(rt, "providers", [])),
                    "max_batch_pixels": s.batcher.max_batch_pixels,
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
                    rid = msg["id"]
                    front.tasks[rid] = asyncio.create_task(self._infer(front, msg))
                elif kind == "cancel":
                    task = front.tasks.get(msg["id"])
                    if task is not None:
                        task.cancel()
                elif kind == "call":
                    rid = msg["id"]
                    front.tasks[rid] = asyncio.create_task(self._call(front, msg))
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
            for task in list(front.tasks.values()):
                task.cancel()
            await asyncio.gather(*front.tasks.values(), return_exceptions=True)
            if front.shm is not None:
                ipc.detach(front.shm)
            writer.close()
            log.info("front disconnected", extra={"front_pid": front.pid, "fronts": len(self.fronts)})
            self.broadcast()

    async def _infer(self, front: _Front, msg: dict[str, Any]) -> None:
        rid = msg["id"]
        reply: dict[str, Any]
        try:
            region: ipc.Region | None = msg.get("xr")
            x = region.view(front.shm.buf) if region is not None else msg["x"]
            async with self.repo.lease(msg["model"]) as served:
                y = await served.batcher.submit(msg["op"], x, msg["deadline"])
            del x
            out: ipc.Region | None = msg.get("yr")
            if out is not None and tuple(y.shape) == out.shape and y.dtype == np.dtype(out.dtype):
                out.view(front.shm.buf)[...] = y
                reply = {"t": "rep", "id": rid, "ok": True}
            else:  # no room in the slab, or not the shape the front expected (a reload changed the model)
                reply = {"t": "rep", "id": rid, "ok": True, "y": np.ascontiguousarray(y)}
        except asyncio.CancelledError:
            # Its front frees the regions on this reply. Were the item already in a running batch, that
            # batch may still read the input region (the answer region is never written: that happens
            # above, after submit returned); what a reused input region could change is the cancelled
            # item's own result, which nobody reads, never another image's (every image is its own sample).
            reply = {"t": "rep", "id": rid, "err": "cancelled", "msg": "cancelled"}
        except Exception as exc:
            reply = {"t": "rep", "id": rid, **error_fields(exc)}
        front.tasks.pop(rid, None)
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
        front.tasks.pop(rid, None)
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
    asyncio.run(Engine(settings, socket_path).run())
