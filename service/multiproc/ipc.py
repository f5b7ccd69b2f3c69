"""What the front processes and the inference process share (`front_workers` > 0): the control-channel
framing and the shared-memory slab that carries pixel arrays and token grids.

Control channel: one Unix stream socket per front; each message is a 4-byte big-endian length and a
pickle of a small dict (the two ends are processes of one server, started by it: the channel is
trusted). Arrays do not travel in it: each front owns one shared-memory segment (its *slab*), writes a
request's input array into a region of it and reserves a region for the answer; the inference
process maps the slab once per connection, reads the input in place and writes the answer there. Only
an array that does not fit in the free part of the slab travels inline (pickled), so a full slab
slows a request down but never fails it.

Segments are named `vqtok-<server id>-<front pid>-<n>`, so the server removes what a
killed front left behind (`sweep`), and the inference process never unlinks one (it unregisters each
segment it attaches from multiprocessing's resource tracker, which would otherwise unlink it when the
inference process exits).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import glob
import os
import pickle
import struct
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

_LEN = struct.Struct(">I")
ALIGN = 64
SHM_DIR = "/dev/shm"
MAX_MESSAGE = 1 << 31


async def read_msg(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next message; `asyncio.IncompleteReadError` at the end of the stream."""
    head = await reader.readexactly(_LEN.size)
    (n,) = _LEN.unpack(head)
    return pickle.loads(await reader.readexactly(n))  # type: ignore[no-any-return]


def pack(msg: dict[str, Any]) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) >= MAX_MESSAGE:
        raise ValueError(f"control message of {len(body)} bytes is too large")
    return _LEN.pack(len(body)) + body


def segment_prefix(server_id: str) -> str:
    return f"vqtok-{server_id}-"


def sweep(server_id: str) -> list[str]:
    """Unlink every slab segment of server `server_id` still in /dev/shm; returns their names."""
    removed = []
    for path in glob.glob(os.path.join(SHM_DIR, segment_prefix(server_id) + "*")):
        try:
            os.unlink(path)
            removed.append(os.path.basename(path))
        except FileNotFoundError:
            pass
    return removed


@dataclass(frozen=True)
class Region:
    """`nbytes` bytes at `offset` of a slab, holding an array of `shape` and `dtype`."""

    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str

    def view(self, buf: memoryview | None) -> np.ndarray:
        return np.ndarray(self.shape, dtype=np.dtype(self.dtype), buffer=buf, offset=self.offset)


class Slab:
    """A front's shared-memory segment and a first-fit allocator over it (one event loop: no locks)."""

    def __init__(self, name: str, size: int) -> None:
        self.size = max(ALIGN, size // ALIGN * ALIGN)
        self.shm = shared_memory.SharedMemory(name=name, create=True, size=self.size)
        self.name = self.shm.name
        try:  # its pages now: a write into a page a full tmpfs cannot give would be SIGBUS, the process gone
            fd = os.open(os.path.join(SHM_DIR, self.name.lstrip("/")), os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError:
            self.close()
            raise
        self._free: list[tuple[int, int]] = [(0, self.size)]  # sorted (offset, length)

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self._free)

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype[Any] | str) -> Region | None:
        """A region for an array of `shape`/`dtype`, or None when no free run is large enough."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for i, (off, n) in enumerate(self._free):
            if n >= need:
                if n == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, n - need)
                return Region(off, need, tuple(int(s) for s in shape), dt.str)
        return None

    def free(self, region: Region) -> None:
        entry = (region.offset, region.nbytes)
        i = bisect.bisect(self._free, entry)
        self._free.insert(i, entry)
        # coalesce with the neighbours
        if i + 1 < len(self._free) and self._free[i][0] + self._free[i][1] == self._free[i + 1][0]:
            self._free[i] = (self._free[i][0], self._free[i][1] + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == self._free[i][0]:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]

    def close(self) -> None:
        """Unmap and unlink the segment."""
        with contextlib.suppress(BufferError):  # a view is still alive somewhere; the mapping goes with the process
            self.shm.close()
        with contextlib.suppress(FileNotFoundError):
            self.shm.unlink()


def attach(name: str) -> shared_memory.SharedMemory:
    """Map a front's slab in the inference process, without handing it to this process's resource
    tracker (which would unlink it, under the front, when this process exits)."""
    shm = shared_memory.SharedMemory(name=name, create=False)
    with contextlib.suppress(Exception):  # the tracker's API is private
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm


def detach(shm: shared_memory.SharedMemory) -> None:
    with contextlib.suppress(BufferError):  # a batch still holds a view; the mapping goes when it is collected
        shm.close()
