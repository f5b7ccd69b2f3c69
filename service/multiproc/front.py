"""The front side of a split server (`front_workers` > 0): the model repository as the routes see it,
backed by the inference process (`inference.py`).

`RemoteRepository` is a `Repository` whose entries mirror the inference process's (pushed to every
front after each change); a lease hands out a `RemoteServed` whose runtime facts are the model's and
whose batcher forwards `submit` to the inference process, raising the problem the real batcher raised
there, so the routes, their errors and their status codes are the same code in both modes. When the inference process is gone every request and `/readyz` answer 503 (model-not-ready,
not-ready) until it is back; requests it held fail at once, none waits for its deadline.

The requests a front queues in one turn of its event loop for one model, op, item shape and dtype go
to the inference process as one `infer` message (`InferenceClient`; inference.py says why and what the
message holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from prometheus_client import generate_latest

from models.core.errors import ModelNotReady, rebuild_problem

from ..batcher import Key, batch_limit, item_pixels
from ..metrics import Metrics
from ..repository import ModelEntry, Repository, Served
from ..settings import Settings
from . import ipc

log = logging.getLogger("vqtok.front")

GONE = "the inference process is not running (it is starting, restarting or exited)"


class InferenceGone(ModelNotReady):
    """The inference process went away (or never came) while this request needed it."""


def raise_error(rep: dict[str, Any]) -> None:
    """Raise the exception the inference process reported (`inference.error_fields`)."""
    err, msg = rep["err"], rep.get("msg", "")
    if err == "cancelled":
        raise InferenceGone("the inference process dropped this request")
    raise rebuild_problem(err, msg, retry_after_s=rep.get("retry_after_s"), extra=rep.get("extra"))


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future[dict[str, Any]]
    regions: tuple[ipc.Region, ...] = ()


@dataclass(eq=False)
class _Group:
    """Infer requests of one turn of the event loop, one model, op, item shape and dtype, their arrays
    in the slab: one `infer` message."""

    msg: dict[str, Any]
    limit: int  # images it may hold (`RemoteBatcher.group_limit`)
    images: int = 0


class InferenceClient:
    """One front's connection to the inference process: requests with ids, replies by id, its slab."""

    def __init__(self, socket_path: str, slab: ipc.Slab | None, metrics: Metrics) -> None:
        self.socket_path = socket_path
        self.slab = slab
        self.metrics = metrics
        self._writer: asyncio.StreamWriter | None = None
        self._outbox: list[bytes] = []  # messages of this turn of the event loop, written together (`_flush`)
        self._groups: dict[tuple[Any, ...], _Group] = {}  # infer requests of this turn, by (model, op, item shape, dtype)
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self.connected = asyncio.Event()
        self.on_snapshot: Any = None  # called with each snapshot the inference process sends, None when it is lost
        metrics.shared_memory_used.set_function(lambda: slab.size - slab.free_bytes if slab is not None else 0)

    # --- connection ---

    async def run(self) -> None:
        """Connect, serve replies, and reconnect whenever the inference process goes away (until cancelled)."""
        announced = False
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=2**20)
            except (FileNotFoundError, ConnectionError, OSError):
                if not announced:
                    log.info("waiting for the inference process", extra={"socket": self.socket_path})
                    announced = True
                await asyncio.sleep(0.1)
                continue
            announced = False
            try:
                writer.write(ipc.pack({"t": "hello", "pid": os.getpid(), "shm": self.slab.name if self.slab else None}))
                self._writer = writer
                self.connected.set()
                await self._read(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                self._lost()
                writer.close()
            log.error("lost the inference process; answering 503 until it is back")
            await asyncio.sleep(0.1)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            msg = await ipc.read_msg(reader)
            kind = msg["t"]
            if kind == "rep" and "ids" in msg:  # an infer's requests
                answers = msg.pop("ys", {})
                for rid in msg["ids"]:
                    y = answers.get(rid)
                    self._settle(rid, msg if y is None else {**msg, "y": y})
            elif kind == "rep":
                self._settle(msg["id"], msg)
            elif kind == "snap":
                if self.on_snapshot is not None:
                    self.on_snapshot(msg)
            elif kind == "collect":
                self._send({"t": "families", "id": msg["id"], "families": list(self.metrics.registry.collect())})

    def _settle(self, rid: int, rep: dict[str, Any]) -> None:
        entry = self._pending.pop(rid, None)
        if entry is None:
            return
        if entry.future.done():  # its request was cancelled: the regions are free only now
            self._free(entry.regions)
        else:
            entry.future.set_result(rep)

    def _lost(self) -> None:
        self._writer = None
        self._outbox, self._groups = [], {}  # never delivered: their requests fail below with the others
        self.connected.clear()
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if entry.future.done():
                self._free(entry.regions)
            else:
                entry.future.set_exception(InferenceGone(GONE))
        if self.on_snapshot is not None:
            self.on_snapshot(None)

    def _send(self, msg: dict[str, Any]) -> None:
        """Queue `msg` for the inference process; the messages of one turn of the event loop leave in one
        write, so that process reads the requests of many HTTP requests at once (its event loop is the
        one every request goes through)."""
        self._open_turn()
        self._outbox.append(ipc.pack(msg))

    def _join(self, rid: int, model: str, op: str, xr: ipc.Region, yr: ipc.Region, deadline: float, limit: int) -> None:
        """Add request `rid` (its arrays in the slab) to this turn's group for its model, op, item shape
        and dtype; a group that it would take past `limit` images leaves now, and it starts the next."""
        self._open_turn()
        key = (model, op, xr.shape[1:], xr.dtype)
        n = xr.shape[0]
        group = self._groups.get(key)
        if group is not None and group.images + n > group.limit:
            self._outbox.append(ipc.pack(self._groups.pop(key).msg))
            group = None
        if group is None:
            msg = {"t": "infer", "ids": [], "model": model, "op": op, "deadline": deadline, "xr": [], "yr": []}
            group = self._groups[key] = _Group(msg, limit)
        group.msg["ids"].append(rid)
        group.msg["xr"].append(xr)
        group.msg["yr"].append(yr)
        group.msg["deadline"] = max(group.msg["deadline"], deadline)  # why the latest: inference.py
        group.images += n

    def _open_turn(self) -> None:
        """InferenceGone unless connected; the first message of a turn of the event loop schedules its `_flush`."""
        if self._writer is None or self._writer.is_closing():
            raise InferenceGone(GONE)
        if not self._outbox and not self._groups:
            asyncio.get_running_loop().call_soon(self._flush, self._writer)

    def _flush(self, writer: asyncio.StreamWriter) -> None:
        # the groups still open go last, after those that filled earlier in this turn; a `cancel` in the
        # outbox never names a request of theirs (a cancelled request resumes only after this flush)
        data = b"".join([*self._outbox, *(ipc.pack(g.msg) for g in self._groups.values())])
        self._outbox, self._groups = [], {}
        if data and writer is self._writer and not writer.is_closing():
            writer.write(data)

    def _free(self, regions: tuple[ipc.Region, ...]) -> None:
        if self.slab is not None:
            for r in regions:
                self.slab.free(r)

    # --- requests ---

    async def _exchange(self, send: Callable[[int], None], regions: tuple[ipc.Region, ...] = ()) -> dict[str, Any]:
        """Give a request an id, `send(id)` it and wait for its reply; cancelling sends `cancel`, and the
        regions stay reserved until the inference process answers (it may be writing into them)."""
        rid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Pending(future, regions)
        try:
            send(rid)
        except BaseException:
            self._pending.pop(rid, None)
            self._free(regions)
            raise
        try:
            rep = await future
        except asyncio.CancelledError:
            if rid in self._pending:  # no answer yet: the reader frees the regions when it comes
                with contextlib.suppress(InferenceGone):
                    self._send({"t": "cancel", "id": rid})
            else:
                self._free(regions)
            raise
        except BaseException:
            self._free(regions)
            raise
        return rep

    async def call(self, fn: str, **kwargs: Any) -> Any:
        rep = await self._exchange(lambda rid: self._send({"t": "call", "id": rid, "fn": fn, **kwargs}))
        if "err" in rep:
            raise_error(rep)
        return rep["value"]

    async def infer(
        self, model: str, op: str, array: np.ndarray, deadline: float, out_shape: tuple[int, ...], out_dtype: str, limit: int
    ) -> np.ndarray:
        """`limit`: the images a group of this request's kind may hold (`RemoteBatcher.group_limit`)."""
        xr = yr = None
        if self.slab is not None:
            xr = self.slab.alloc(array.shape, array.dtype)
            yr = self.slab.alloc(out_shape, out_dtype) if xr is not None else None
            if xr is not None and yr is None:
                self.slab.free(xr)
                xr = None
        regions: tuple[ipc.Region, ...] = ()
        if xr is not None and yr is not None and self.slab is not None:
            xr.view(self.slab.shm.buf)[...] = array
            regions = (xr, yr)
            rep = await self._exchange(lambda rid: self._join(rid, model, op, xr, yr, deadline, limit), regions)
        else:
            msg = {"t": "infer", "model": model, "op": op, "deadline": deadline, "x": np.ascontiguousarray(array)}
            rep = await self._exchange(lambda rid: self._send({**msg, "ids": [rid]}))
        try:
            if "err" in rep:
                raise_error(rep)
            if "y" in rep:
                return cast(np.ndarray, rep["y"])
            assert yr is not None and self.slab is not None
            return yr.view(self.slab.shm.buf).copy()
        finally:
            self._free(regions)


@dataclass(frozen=True)
class RemoteServed:
    """A served version in the inference process, as a front sees it (`repository.Served`)."""

    name: str
    path: Path
    runtime: RemoteRuntime
    batcher: RemoteBatcher
    loaded_at: float


class RemoteRuntime:
    """What the routes read of a runtime, as the inference process reported it."""

    def __init__(self, served: dict[str, Any]) -> None:
        self.info = served["info"]
        self.device = served["device"]
        self.runtime_name = served["runtime_name"]
        self.providers = tuple(served["providers"])


class RemoteBatcher:
    """`Batcher.submit` of the model's batcher in the inference process."""

    def __init__(self, client: InferenceClient, model: str, served: dict[str, Any]) -> None:
        self._client = client
        self.model = model
        self.max_batch_size: int = served["max_batch_size"]
        self.workers: int = served["batch_workers"]
        self.max_batch_pixels: int | None = served["max_batch_pixels"]
        self.max_queue_images: int = served["max_queue_images"]
        self.queued_images: int = served["queued_images"]
        self.downsample: int = served["info"].downsample

    def image_pixels(self, key: tuple[Any, ...]) -> int:
        return item_pixels(key, self.downsample)

    def group_limit(self, key: Key) -> int:
        """Images of bucket `key` that one grouped `infer` may carry: what one batch takes, and never more
        than the queue holds (so that a group is never `TooLarge` where its requests alone would not be)."""
        return min(batch_limit(key, self.max_batch_size, self.max_batch_pixels, self.downsample), self.max_queue_images)

    async def submit(self, op: str, array: np.ndarray, deadline: float) -> np.ndarray:
        f, n = self.downsample, int(array.shape[0])
        if op == "encode":
            out_shape: tuple[int, ...] = (n, int(array.shape[1]) // f, int(array.shape[2]) // f)
            out_dtype = "<i4"
        else:
            out_shape, out_dtype = (n, int(array.shape[1]) * f, int(array.shape[2]) * f, 3), "|u1"
        limit = self.group_limit((op, *array.shape[1:]))
        return await self._client.infer(self.model, op, array, deadline, out_shape, out_dtype, limit)


class RemoteRepository(Repository):
    """The inference process's repository, seen from a front."""

    def __init__(self, settings: Settings, metrics: Metrics, socket_path: str, slab: ipc.Slab | None) -> None:
        super().__init__(settings, metrics)
        self.client = InferenceClient(socket_path, slab, metrics)
        self.client.on_snapshot = self._apply
        self._connected = False  # to the inference process, with its snapshot applied
        self._fronts = 0  # fronts connected to it, as it last said

    def _apply(self, snap: dict[str, Any] | None) -> None:
        if snap is None:  # connection lost: keep the entries (for /v1/models), serve nothing
            self._connected = False
            return
        self._connected = True
        self._fronts = int(snap.get("fronts", 0))
        entries = {}
        for m in snap["models"]:
            served = None
            if m["served"] is not None:
                s = m["served"]
                runtime, batcher = RemoteRuntime(s), RemoteBatcher(self.client, m["name"], s)
                served = RemoteServed(m["name"], Path(m["path"]), runtime, batcher, s["loaded_at"])
            entries[m["name"]] = ModelEntry(m["name"], Path(m["path"]), m["state"], m["error"], served)
        self._entries = entries
        self.loaded = bool(snap["loaded"])

    def not_ready_reason(self) -> str | None:
        if not self._connected:
            return GONE
        want = self.settings.front_workers
        if self._fronts < want:
            return f"{self._fronts} of {want} front processes are connected to the inference process"
        return super().not_ready_reason()

    @asynccontextmanager
    async def lease(self, name: str | None) -> AsyncIterator[Served]:
        if not self._connected:
            raise InferenceGone(GONE)
        yield self.served(name)

    async def load_all(self) -> None:
        """The connection to the inference process, for the life of the front (cancelled at shutdown)."""
        await self.client.run()

    async def reload(self, name: str | None = None) -> list[dict[str, Any]]:
        """Reload in the inference process (UnknownModel passes through as in one process); every front
        gets the new snapshot."""
        return cast(list[dict[str, Any]], await self.client.call("reload", model=name))

    async def refresh(self) -> None:
        """A fresh snapshot (queue depths) for /v1/models; the last one if the inference process is away."""
        with contextlib.suppress(InferenceGone, asyncio.TimeoutError):
            self._apply(await asyncio.wait_for(self.client.call("snapshot"), 2.0))

    async def exposition(self) -> bytes:
        """Metrics of the inference process and of every front, summed; this front's alone when it is away."""
        try:
            return cast(bytes, await asyncio.wait_for(self.client.call("metrics"), 5.0))
        except (InferenceGone, asyncio.TimeoutError):
            return generate_latest(self.metrics.registry)

    async def close(self) -> None:
        if self.client.slab is not None:
            self.client.slab.close()


def front_slab(settings: Settings, name: str) -> ipc.Slab | None:
    """The front's shared-memory slab (`ipc.Slab`), or None: with front_shm_mib=0, or where /dev/shm has no
    room for it (a container's default 64 MiB), when pixels travel through the control socket instead."""
    if not settings.front_shm_mib:
        return None
    try:
        return ipc.Slab(name, settings.front_shm_mib * 2**20)
    except OSError as exc:
        log.warning(
            "no room for this front's %d MiB slab in /dev/shm (%s): pixels go through the control socket (slower); "
            "give /dev/shm front_workers x front_shm_mib (docker run --shm-size)",
            settings.front_shm_mib,
            exc,
        )
        return None


def remote_repository(inference_socket: str, server_id: str) -> Callable[[Settings, Metrics], RemoteRepository]:
    """The repository factory of a front's app (`create_app(repository=...)`): the inference process at
    `inference_socket`; `server_id` names this front's shared-memory slab (`ipc.sweep` removes what a
    killed front left)."""

    def build(settings: Settings, metrics: Metrics) -> RemoteRepository:
        slab = front_slab(settings, slab_name(server_id or str(os.getppid())))
        return RemoteRepository(settings, metrics, inference_socket, slab)

    return build


def slab_name(server_id: str) -> str:
    return f"{ipc.segment_prefix(server_id)}{os.getpid()}-{int(time.time() * 1000) % 10**6}"
