"""Reading and decoding the images of a job, in worker threads or processes, ahead of the encoder.

The pixels come from the one pixel rule (`models.core.pixels`), so every engine feeds the model the
same arrays. For an encoder that takes encoded files (a server, which decodes them itself) the
workers only read the stored bytes and the size from the header (`probe_items`).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import glob
import itertools
import mmap
import multiprocessing
import os
import secrets
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.core import pixels
from models.core.errors import ImageError, ImageShapeError, ImageTooLarge
from models.core.sources import RawItem, Source

from .format import DEFAULT_MAX_TOKENS, ErrorKind, ModelSpec, TokenizeError

DecodePool = Literal["auto", "thread", "process"]
DECODE_POOLS: tuple[str, ...] = ("auto", "thread", "process")
# images per task sent to a decoding process: each task costs the driver a pickled submit, a pipe wake-up
# and a tmpfs map, so larger tasks cut the driver's CPU per image (the driver is the local engine's limit)
PROCESS_CHUNK = 32
SHARED_DIR = "/dev/shm"  # where decoding processes hand their pixels over (tmpfs: memory, not disk)

_UNREADABLE: tuple[type[Exception], ...] = (OSError, ImageError)  # missing, truncated, undecodable
_REFUSED: tuple[type[Exception], ...] = (ImageTooLarge, ImageShapeError)  # readable, but too large or the wrong shape


def _failure(exc: Exception) -> tuple[str, ErrorKind]:
    return f"{type(exc).__name__}: {exc}", "refused" if isinstance(exc, _REFUSED) else "unreadable"


@dataclass
class Prepared:
    item: RawItem
    pixels: np.ndarray | None = None  # uint8 (H, W, 3), ready for the model
    source: tuple[int, int] = (0, 0)  # (height, width) before resizing
    error: str | None = None
    data: bytes | None = None  # the stored bytes, for an encoder that takes them as they are
    kind: ErrorKind = "unreadable"  # with `error`: why it was not tokenized

    @property
    def ready(self) -> bool:
        return self.pixels is not None or self.data is not None


def prepare_item(item: RawItem, spec: ModelSpec, resize: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> Prepared:
    """Read and decode one image by the pixel rule, for `spec`'s model; a failure is the item's error:
    unreadable (missing, undecodable) or refused (over the pixel limit, a token grid over `max_tokens`,
    or sides that are not multiples of f under resize none)."""
    try:
        data = item.read()
        prepared = pixels.prepare(
            data,
            downsample=spec.downsample,
            resolution=spec.resolution,
            resize=pixels.resize_mode(resize),
            max_grid_tokens=max_tokens,
        )
    except _UNREADABLE + _REFUSED as exc:
        reason, kind = _failure(exc)
        return Prepared(item, error=reason, kind=kind)
    return Prepared(item, prepared.pixels, prepared.source_size)


# pixels or bytes, source size, error, its kind (pixels in a `SharedChunk`: their (offset, shape) in its file)
Decoded = tuple[np.ndarray | bytes | tuple[int, tuple[int, ...]] | None, tuple[int, int], str | None, ErrorKind]


def decode_items(items: Sequence[RawItem], spec: ModelSpec, resize: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[Decoded]:
    """The unit of work of a decoding worker: what comes back is only what the driver lacks (not the
    items themselves, whose bytes would otherwise cross a process boundary twice)."""
    return [(p.pixels, p.source, p.error, p.kind) for p in (prepare_item(item, spec, resize, max_tokens) for item in items)]


@dataclass
class SharedChunk:
    """What a decoding process returns for a chunk of images: their pixels in one file on tmpfs, which
    the driver maps and unlinks (`open`), and per image its `Decoded` with `(offset, shape)` in place
    of the array. Pickling the arrays back through the pool's pipe instead costs the driver more CPU per
    image (bench/host_pipeline_cpu.py measures it), and the driver is what holds the local engine below
    the GPU's rate on a many-core host."""

    path: str
    size: int
    decoded: list[Decoded]

    def open(self) -> list[Decoded]:
        """The decoded images as arrays over the mapped file (no copy); the file's name is gone at once,
        its memory when the last array of the chunk is."""
        if not self.path:
            return self.decoded
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.unlink(self.path)
            buf = mmap.mmap(fd, self.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        out: list[Decoded] = []
        for payload, size, error, kind in self.decoded:
            if isinstance(payload, tuple):
                offset, shape = payload
                count = int(np.prod(shape))
                payload = np.frombuffer(buf, np.uint8, count, offset).reshape(shape)
            out.append((payload, size, error, kind))
        return out


def shared_prefix() -> str:
    """A prefix for one job's hand-over files: this process and a random tag, so `sweep_shared` removes
    exactly what this job's workers left behind (a job that failed, a killed worker)."""
    return f"vqtok-decode-{os.getpid()}-{secrets.token_hex(4)}-"


def shared_available() -> bool:
    return os.path.isdir(SHARED_DIR) and os.access(SHARED_DIR, os.W_OK)


def sweep_shared(prefix: str) -> None:
    for path in glob.glob(os.path.join(SHARED_DIR, glob.escape(prefix) + "*")):
        with contextlib.suppress(OSError):
            os.unlink(path)


def decode_shared(
    items: Sequence[RawItem], spec: ModelSpec, resize: str, max_tokens: int = DEFAULT_MAX_TOKENS, *, prefix: str = ""
) -> SharedChunk:
    """`decode_items` in a decoding process, the pixels written to one tmpfs file named `prefix`…
    instead of pickled back (a chunk with no pixels, or a failed write, comes back as it is)."""
    decoded = decode_items(items, spec, resize, max_tokens)
    arrays = [payload for payload, *_ in decoded if isinstance(payload, np.ndarray)]
    total = sum(a.nbytes for a in arrays)
    if total == 0:
        return SharedChunk("", 0, decoded)
    fd, path = tempfile.mkstemp(prefix=prefix, dir=SHARED_DIR)
    try:
        # allocate, not just size, the file: writing through the mapping into pages a full tmpfs cannot
        # give is SIGBUS (the worker dies), where a failed allocation is ENOSPC, handled below
        os.posix_fallocate(fd, 0, total)
        with mmap.mmap(fd, total) as buf:
            slots: list[Decoded] = []
            offset = 0
            for payload, size, error, kind in decoded:
                if isinstance(payload, np.ndarray):
                    view = np.frombuffer(buf, np.uint8, payload.nbytes, offset).reshape(payload.shape)
                    view[...] = payload
                    del view  # the mapping closes only without views
                    slots.append(((offset, payload.shape), size, error, kind))
                    offset += payload.nbytes
                else:
                    slots.append((payload, size, error, kind))
    except OSError:  # tmpfs full (a container's 64 MiB /dev/shm, say): pickle this chunk back instead
        with contextlib.suppress(OSError):
            os.unlink(path)
        return SharedChunk("", 0, decoded)
    finally:
        os.close(fd)
    return SharedChunk(path, total, slots)


def probe_items(items: Sequence[RawItem], spec: ModelSpec, resize: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[Decoded]:
    """The work for an encoder that takes encoded images (a server, which decodes them itself): read
    the bytes and the size from the header; nothing is decoded here (the server's limits apply, not
    `max_tokens`)."""
    out: list[Decoded] = []
    for item in items:
        try:
            data = item.read()
            out.append((data, pixels.probe_image(data), None, "unreadable"))
        except _UNREADABLE + _REFUSED as exc:
            out.append((None, (0, 0), *_failure(exc)))
    return out


def decode_executor(kind: str, workers: int) -> cf.Executor:
    """Threads (Pillow, simplejpeg and numpy release the GIL while decoding) or processes (no GIL at
    all; their pixels come back through tmpfs, `decode_shared`). Processes are spawned, never forked:
    the parent may hold a CUDA context and threads."""
    if kind == "thread":
        return cf.ThreadPoolExecutor(workers, thread_name_prefix="vqtok-decode")
    if kind == "process":
        return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    raise TokenizeError(f"unknown decode pool {kind!r}; expected thread or process")


def prepared_stream(
    source: Source,
    shards: Sequence[tuple[int, int, int]],
    spec: ModelSpec,
    resize: str,
    pool: cf.Executor,
    window: int,
    waited: list[float] | None = None,
    chunk: int = 1,
    work: Callable[[Sequence[RawItem], ModelSpec, str, int], list[Decoded] | SharedChunk] = decode_items,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> Iterator[tuple[int, Prepared]]:
    """(shard, prepared image) for every item of `shards` ((shard, start, end) each), in order; up to
    `window` images decode ahead, `chunk` images per task. Seconds spent waiting for a decode are added
    to `waited[0]`. `work`: `decode_items` (pixels), `decode_shared` (pixels through tmpfs, for decoding
    processes) or `probe_items` (the stored bytes, for a server)."""
    ahead: deque[tuple[int, list[RawItem], cf.Future[list[Decoded] | SharedChunk]]] = deque()
    queued = 0
    clock = waited if waited is not None else [0.0]

    def take() -> Iterator[tuple[int, Prepared]]:
        nonlocal queued
        shard, items, fut = ahead.popleft()
        queued -= len(items)
        t = time.perf_counter()
        result = fut.result()
        clock[0] += time.perf_counter() - t
        decoded = result.open() if isinstance(result, SharedChunk) else result
        for item, (payload, size, error, kind) in zip(items, decoded, strict=True):
            if isinstance(payload, bytes):
                yield shard, Prepared(item, None, size, error, data=payload, kind=kind)
            else:
                yield shard, Prepared(item, payload if isinstance(payload, np.ndarray) else None, size, error, kind=kind)

    for shard, start, end in shards:
        items = iter(source.slice(start, end))
        while batch := list(itertools.islice(items, chunk)):
            ahead.append((shard, batch, pool.submit(work, batch, spec, resize, max_tokens)))
            queued += len(batch)
            while queued >= window:
                yield from take()
    while ahead:
        yield from take()
