"""Dataset tokenization: images in, parquet shards of token ids out, resumable after any interruption.

Layout of an output folder:
    part-00000.parquet ...   one row per image: key, index, tokens (int32 list, row-major h·w),
                             grid_h, grid_w, source_h, source_w; file metadata names the model
    manifest.json            the job (input fingerprint, model, resize, shard size) and every
                             committed shard with its row count, errors and sha256
    errors.jsonl             one line per unreadable image: key, index, reason (rebuilt from the manifest)

Shard k holds source items [k·S, (k+1)·S) (see `sources`). A shard is committed by writing a temporary
file, renaming it into place, then rewriting the manifest atomically; a re-run skips the shards the
manifest lists and redoes the rest. A kill at any moment therefore loses no image and duplicates none,
and a re-run writes byte-identical shards.

Engines: `tokenize_local` (this module) with a `RuntimeEncoder` (images decoded here, in threads or
processes, and encoded in-process) or a `ServerEncoder` (the stored files sent as they are to a
running service, which decodes them), and `clients.tokenize_ray.tokenize_ray` (Ray Data); all share
the plan, writer and manifest.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.core import pixels as _images
from models.core.errors import ImageError, ImageShapeError, ImageTooLarge
from models.core.sources import FolderSource, ParquetSource, RawItem, TarSource, open_source

from .errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError, ValidationError

log = logging.getLogger("vqtok.tokenize")

Source = FolderSource | ParquetSource | TarSource

FORMAT = "vqtok-tokens/1"
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
DEFAULT_SHARD_SIZE = 4096
DEFAULT_BATCH_SIZE = 32

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("index", pa.int64()),
        ("tokens", pa.list_(pa.int32())),
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("source_h", pa.int32()),
        ("source_w", pa.int32()),
    ]
)


class TokenizeError(Exception):
    """A job that cannot run as asked (output folder of another job, unreadable input, ...)."""


# ---------------------------------------------------------------- the job
@dataclass(frozen=True)
class ModelSpec:
    """What the output records about the model that produced it."""

    name: str
    codebook_size: int
    downsample: int
    resolution: int
    manifest_sha256: str
    precision: str  # fp32 / fp16 graphs: tokens may differ between them, so a job never mixes the two

    @classmethod
    def from_info(cls, info: Any) -> ModelSpec:
        return cls(
            str(info.name),
            int(info.codebook_size),
            int(info.downsample),
            int(info.resolution),
            str(info.manifest_sha256),
            str(info.precision),
        )


@dataclass(frozen=True)
class Job:
    """Everything that determines the output; a re-run resumes only when it is identical."""

    source_kind: str
    num_items: int
    fingerprint: str  # of the listed keys and sizes
    shard_size: int
    resize: str
    model: ModelSpec

    @property
    def num_shards(self) -> int:
        return -(-self.num_items // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_items)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "format": FORMAT, "num_shards": self.num_shards}


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Manifest:
    """`manifest.json` of an output folder: the job and its committed shards. Only the driver writes it."""

    def __init__(self, out_dir: Path, job: Job, input_path: str, shards: dict[int, dict[str, Any]]) -> None:
        self.out_dir, self.job, self.input_path, self.shards = out_dir, job, input_path, shards

    @classmethod
    def open(cls, out_dir: Path, job: Job, input_path: str, overwrite: bool = False) -> Manifest:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / MANIFEST
        shards: dict[int, dict[str, Any]] = {}
        if path.exists() and not overwrite:
            try:
                body = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise TokenizeError(f"{path} is unreadable ({exc}); remove it or pass --overwrite") from exc
            if body.get("job") != job.to_json():
                raise TokenizeError(
                    f"{out_dir} holds the output of a different job (input, model, resize or shard size differ): "
                    f"use another --output, or --overwrite to start over\n  there: {json.dumps(body.get('job'))}\n  now:   {json.dumps(job.to_json())}"
                )
            for k, rec in body.get("shards", {}).items():
                if (out_dir / rec["file"]).exists():  # a committed shard whose file was deleted is redone
                    shards[int(k)] = rec
        for stale in out_dir.glob(".part-*.tmp-*"):  # leftovers of an interrupted write
            stale.unlink(missing_ok=True)
        manifest = cls(out_dir, job, input_path, shards)
        if overwrite:
            for old in out_dir.glob("part-*.parquet"):
                old.unlink()
        manifest._write()
        return manifest

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.job.num_shards

    def pending(self) -> list[int]:
        return [k for k in range(self.job.num_shards) if k not in self.shards]

    def commit(self, shard: int, record: dict[str, Any]) -> None:
        self.shards[shard] = record
        self._write()

    def _write(self) -> None:
        body = {
            "job": self.job.to_json(),
            "input": self.input_path,
            "complete": self.complete,
            "totals": {
                "images": sum(r["rows"] for r in self.shards.values()),
                "errors": sum(len(r["errors"]) for r in self.shards.values()),
                "shards": len(self.shards),
            },
            "shards": {f"{k:05d}": self.shards[k] for k in sorted(self.shards)},
        }
        _atomic_write(self.out_dir / MANIFEST, (json.dumps(body, indent=1) + "\n").encode())

    def write_errors_file(self) -> None:
        lines = [json.dumps(e) + "\n" for k in sorted(self.shards) for e in self.shards[k]["errors"]]
        _atomic_write(self.out_dir / ERRORS, "".join(lines).encode())


# ---------------------------------------------------------------- one shard's rows
@dataclass
class ShardBuffer:
    """Rows of one shard as they arrive (in any order); written sorted by index."""

    shard: int
    expected: int
    indices: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)  # int32 (h, w) each
    sources: list[tuple[int, int]] = field(default_factory=list)  # (height, width)
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def received(self) -> int:
        return len(self.indices) + len(self.errors)

    def add(self, index: int, key: str, tokens: np.ndarray, source: tuple[int, int]) -> None:
        self.indices.append(index)
        self.keys.append(key)
        self.tokens.append(tokens)
        self.sources.append(source)

    def add_error(self, index: int, key: str, reason: str) -> None:
        self.errors.append({"index": index, "key": key, "reason": reason})


def shard_table(buf: ShardBuffer, job: Job) -> pa.Table:
    order = np.argsort(np.asarray(buf.indices, dtype=np.int64), kind="stable")
    toks = [buf.tokens[i] for i in order]
    lengths = np.fromiter((t.size for t in toks), dtype=np.int32, count=len(toks))
    offsets = np.zeros(len(toks) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([t.reshape(-1) for t in toks]).astype(np.int32) if toks else np.zeros(0, np.int32)
    columns = [
        pa.array([buf.keys[i] for i in order], pa.string()),
        pa.array(np.asarray(buf.indices, dtype=np.int64)[order]),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32())),
        pa.array([t.shape[0] for t in toks], pa.int32()),
        pa.array([t.shape[1] for t in toks], pa.int32()),
        pa.array([buf.sources[i][0] for i in order], pa.int32()),
        pa.array([buf.sources[i][1] for i in order], pa.int32()),
    ]
    m = job.model
    metadata = {
        "vqtok.format": FORMAT,
        "vqtok.model": m.name,
        "vqtok.manifest_sha256": m.manifest_sha256,
        "vqtok.codebook_size": str(m.codebook_size),
        "vqtok.downsample": str(m.downsample),
        "vqtok.precision": m.precision,
        "vqtok.resize": job.resize,
        "vqtok.shard": str(buf.shard),
    }
    return pa.Table.from_arrays(columns, schema=SCHEMA.with_metadata(metadata))


def commit_shard(manifest: Manifest, buf: ShardBuffer) -> None:
    """Write the shard's parquet file in place atomically, then record it in the manifest."""
    if buf.received != buf.expected:
        raise RuntimeError(f"shard {buf.shard}: {buf.received} of {buf.expected} items; refusing to commit a partial shard")
    table = shard_table(buf, manifest.job)
    final = manifest.out_dir / shard_name(buf.shard)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    # fixed writer settings and no timestamps: the same rows give the same bytes on every run
    pq.write_table(table, tmp, compression="zstd", use_dictionary=["key"], write_statistics=True)
    with open(tmp, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    errors = sorted(buf.errors, key=lambda e: e["index"])
    manifest.commit(buf.shard, {"file": final.name, "rows": table.num_rows, "errors": errors, "sha256": digest})


# ---------------------------------------------------------------- decoding (runs in worker threads or processes)
DecodePool = Literal["auto", "thread", "process"]
DECODE_POOLS: tuple[str, ...] = ("auto", "thread", "process")
PROCESS_CHUNK = 8  # images per task sent to a decoding process (amortises the pickling round trip)


@dataclass
class Prepared:
    item: RawItem
    pixels: np.ndarray | None = None  # uint8 (H, W, 3), ready for the model
    source: tuple[int, int] = (0, 0)  # (height, width) before resizing
    error: str | None = None
    data: bytes | None = None  # the stored bytes, for an encoder that takes them as they are

    @property
    def ready(self) -> bool:
        return self.pixels is not None or self.data is not None


def prepare_item(item: RawItem, spec: ModelSpec, resize: str) -> Prepared:
    bad: tuple[type[Exception], ...] = (OSError, ImageError, ImageTooLarge, ImageShapeError)
    try:
        data = item.read()
        prepared = _images.prepare(data, downsample=spec.downsample, resolution=spec.resolution, resize=_images.resize_mode(resize))
    except bad as exc:
        return Prepared(item, error=f"{type(exc).__name__}: {exc}")
    return Prepared(item, prepared.pixels, prepared.source_size)


Decoded = tuple[np.ndarray | bytes | None, tuple[int, int], str | None]  # pixels or bytes, source size, error


def decode_items(items: Sequence[RawItem], spec: ModelSpec, resize: str) -> list[Decoded]:
    """The unit of work of a decoding worker: what comes back is only what the driver lacks (not the
    items themselves, whose bytes would otherwise cross a process boundary twice)."""
    return [(p.pixels, p.source, p.error) for p in (prepare_item(item, spec, resize) for item in items)]


def probe_items(items: Sequence[RawItem], spec: ModelSpec, resize: str) -> list[Decoded]:
    """The work for an encoder that takes encoded images (a server, which decodes them itself): read
    the bytes and the size from the header; nothing is decoded here."""
    bad: tuple[type[Exception], ...] = (OSError, ImageError, ImageTooLarge, ImageShapeError)
    out: list[Decoded] = []
    for item in items:
        try:
            data = item.read()
            out.append((data, _images.probe_image(data), None))
        except bad as exc:
            out.append((None, (0, 0), f"{type(exc).__name__}: {exc}"))
    return out


def decode_executor(kind: str, workers: int) -> cf.Executor:
    """Threads (Pillow and numpy release the GIL while decoding) or processes (no GIL at all, at the
    price of pickling every image back). Processes are spawned, never forked: the parent may hold a
    CUDA context and threads."""
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
    work: Callable[[Sequence[RawItem], ModelSpec, str], list[Decoded]] = decode_items,
) -> Iterator[tuple[int, Prepared]]:
    """(shard, prepared image) for every item of `shards`, in order; up to `window` images decode
    ahead, `chunk` images per task. Seconds spent waiting for a decode are added to `waited[0]`.
    `work`: `decode_items` (pixels), or `probe_items` (the stored bytes, for a server)."""
    ahead: deque[tuple[int, list[RawItem], cf.Future[list[Decoded]]]] = deque()
    queued = 0
    clock = waited if waited is not None else [0.0]

    def take() -> Iterator[tuple[int, Prepared]]:
        nonlocal queued
        shard, items, fut = ahead.popleft()
        queued -= len(items)
        t = time.perf_counter()
        decoded = fut.result()
        clock[0] += time.perf_counter() - t
        for item, (payload, size, error) in zip(items, decoded, strict=True):
            if isinstance(payload, bytes):
                yield shard, Prepared(item, None, size, error, data=payload)
            else:
                yield shard, Prepared(item, payload, size, error)

    for shard, start, end in shards:
        items = iter(source.slice(start, end))
        while batch := list(itertools.islice(items, chunk)):
            ahead.append((shard, batch, pool.submit(work, batch, spec, resize)))
            queued += len(batch)
            while queued >= window:
                yield from take()
    while ahead:
        yield from take()


# ---------------------------------------------------------------- encoding
class Encoder(Protocol):
    """What turns a batch of same-sized decoded images into token ids (a runtime)."""

    spec: ModelSpec
    concurrency: int  # batches it may run at the same time
    decode_pool: str  # the decoding pool that keeps it fed ("thread" or "process"), for decode_pool="auto"

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> int32 (B, H/f, W/f)."""
        ...


class FileEncoder(Protocol):
    """What turns encoded image files, as stored, into token ids (a server, which decodes them)."""

    spec: ModelSpec
    concurrency: int
    decode_pool: str

    def encode_files(self, files: Sequence[bytes], resize: str) -> list[np.ndarray]:
        """Encoded images -> int32 (h, w) grids, in order, preprocessed by the pixel rule of `models.core.pixels`."""
        ...


class RuntimeEncoder:
    """Encodes in-process through a `ModelRuntime`.

    On CUDA, by default, three batches run at once (the next ones are copied in and queued while one
    computes, so the device does not wait on the host between batches) and images decode in processes
    (threads, held back by the GIL, fed an H100 at most ~1,100 images/s on 16 cores); on the CPU one
    batch at a time (the session's thread pool already uses every core) and decoding threads. Measured
    in bench/results/tokenize_local_sweep_gpu_h100*.json."""

    def __init__(self, runtime: Any, concurrency: int | None = None) -> None:
        self.runtime, self.spec = runtime, ModelSpec.from_info(runtime.info)
        on_cuda = bool(runtime.providers) and runtime.providers[0] == "CUDAExecutionProvider"
        self.concurrency = concurrency or (3 if on_cuda else 1)
        self.decode_pool = "process" if on_cuda else "thread"

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self.runtime.encode(pixels), dtype=np.int32)


class ServerEncoder:
    """Encodes through a running vqtok service. The stored bytes go as they are (a JPEG stays a
    JPEG: nothing is decoded or re-encoded here) with the job's resize mode; the server preprocesses
    them by the same pixel rule (`models.core.pixels`) as the local engines, so the tokens match theirs. The
    server's limits (pixels per image, tokens per request) apply."""

    def __init__(self, client: Any, model: str | None, concurrency: int = 4) -> None:
        card = client.model(model or client.default_model())
        self.client, self.model = client, card.name
        raw = card.raw
        self.spec = ModelSpec(
            card.name,
            card.codebook_size,
            card.downsample,
            card.resolution,
            str(raw.get("manifest_sha256", "")),
            str(raw.get("precision", "")),
        )
        self.concurrency = concurrency
        self.decode_pool = "thread"  # its workers only read files and headers

    def encode_files(self, files: Sequence[bytes], resize: str) -> list[np.ndarray]:
        return list(self.client.encode(list(files), model=self.model, resize=resize))


# what refuses one image rather than the job: the runtime's InvalidInputError (a ValueError); the
# server's 400 (undecodable), 413 (too large), 415 (format) and 422 (shape) answers
REFUSALS: tuple[type[Exception], ...] = (ValueError, BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError, ValidationError)


def encode_batch(
    encoder: Encoder | FileEncoder, batch: list[Prepared], resize: str = "none"
) -> list[tuple[Prepared, np.ndarray | None, str | None]]:
    """Encode same-shaped images (or encoded files); when the batch is refused, retry image by image
    to isolate the cause."""
    try:
        if batch[0].pixels is None:
            tokens = encoder.encode_files([p.data for p in batch], resize)  # type: ignore[union-attr,misc]
        else:
            tokens = encoder.encode(np.stack([p.pixels for p in batch]))  # type: ignore[union-attr,misc]
    except REFUSALS as exc:
        if len(batch) == 1:
            return [(batch[0], None, f"{type(exc).__name__}: {exc}")]
        return [r for p in batch for r in encode_batch(encoder, [p], resize)]
    return list(zip(batch, tokens, [None] * len(batch), strict=True))  # a count mismatch is a bug, not a refusal


# ---------------------------------------------------------------- the local engine
@dataclass
class Summary:
    output: str
    images: int  # tokenized in this run
    errors: int  # unreadable images in this run
    shards_written: int
    shards_skipped: int  # already committed by an earlier run
    seconds: float
    engine: str = "local"
    # where the local engine's driver thread waited: for decoded images (decoding is the bottleneck)
    # or for the encoder (the model is); both small means the driver's own work bounds the run
    decode_wait_s: float = 0.0
    encode_wait_s: float = 0.0
    decode_pool: str = ""  # the local engine's decoding workers: thread or process

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def plan(input_path: str | Path, spec: ModelSpec, resize: str, shard_size: int) -> tuple[Source, Job]:
    if resize not in _images.RESIZE_MODES:
        raise TokenizeError(f"unknown resize mode {resize!r}; expected one of {', '.join(_images.RESIZE_MODES)}")
    if shard_size < 1:
        raise TokenizeError(f"shard size must be positive, got {shard_size}")
    source = open_source(input_path)
    if len(source) == 0:
        raise TokenizeError(f"no images found in {input_path}")
    return source, Job(source.kind, len(source), source.fingerprint(), shard_size, resize, spec)


def progress_bar(total: int, desc: str, enabled: bool | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", smoothing=0.1, dynamic_ncols=True, disable=None if enabled is None else not enabled)


def tokenize_local(
    input_path: str | Path,
    output_dir: str | Path,
    encoder: Encoder | FileEncoder,
    *,
    resize: str = "none",
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    decode_workers: int | None = None,
    decode_pool: DecodePool = "auto",
    overwrite: bool = False,
    progress: bool | None = None,
    on_commit: Callable[[int], None] | None = None,
) -> Summary:
    """Tokenize every image under `input_path` into `output_dir`, resuming a previous run there.

    Decoding runs in a pool of `decode_workers` threads (Pillow and numpy release the GIL) or
    processes ("auto": the encoder's choice), up to a bounded window ahead of the encoder, so memory
    is bounded by the window, the batch and one shard's token ids."""
    if decode_pool not in DECODE_POOLS:
        raise TokenizeError(f"unknown decode pool {decode_pool!r}; expected one of {', '.join(DECODE_POOLS)}")
    if decode_pool == "auto":
        decode_pool = "process" if getattr(encoder, "decode_pool", "thread") == "process" else "thread"
    t0 = time.perf_counter()
    source, job = plan(input_path, encoder.spec, resize, shard_size)
    manifest = Manifest.open(Path(output_dir), job, str(Path(input_path).resolve()), overwrite)
    pending = manifest.pending()
    ranges = [(k, *job.shard_range(k)) for k in pending]
    total = sum(e - s for _, s, e in ranges)
    work = probe_items if hasattr(encoder, "encode_files") else decode_items
    cpus = os.cpu_count() or 1
    if decode_pool == "process":  # the driver and the encoder's threads keep a core
        workers, chunk = decode_workers or max(1, cpus - 1), PROCESS_CHUNK
    else:
        workers, chunk = decode_workers or min(32, cpus + 2), 1
    window = max(4 * batch_size, 4 * workers * chunk)
    buffers = {k: ShardBuffer(k, e - s) for k, s, e in ranges}
    stats = {"images": 0, "errors": 0, "shards": 0}
    bar = progress_bar(total, f"tokenize {job.model.name}", progress)

    def finish_if_done(shard: int) -> None:
        buf = buffers.get(shard)
        if buf is not None and buf.received == buf.expected:
            commit_shard(manifest, buf)
            del buffers[shard]
            stats["shards"] += 1
            if on_commit is not None:
                on_commit(shard)

    decode_wait, encode_wait = [0.0], [0.0]

    def collect(fut: cf.Future[list[tuple[Prepared, np.ndarray | None, str | None]]], shard: int) -> None:
        t = time.perf_counter()
        results = fut.result()
        encode_wait[0] += time.perf_counter() - t
        for p, tokens, error in results:
            if tokens is None:
                buffers[shard].add_error(p.item.index, p.item.key, error or "encode failed")
                stats["errors"] += 1
            else:
                buffers[shard].add(p.item.index, p.item.key, tokens, p.source)
                stats["images"] += 1
        bar.update(len(results))
        finish_if_done(shard)

    in_flight: deque[tuple[cf.Future[Any], int]] = deque()

    def submit(pool: cf.Executor, shard: int, batch: list[Prepared]) -> None:
        while len(in_flight) >= encoder.concurrency:
            fut, s = in_flight.popleft()
            collect(fut, s)
        in_flight.append((pool.submit(encode_batch, encoder, batch, resize), shard))

    try:
        with (
            decode_executor(decode_pool, workers) as decoders,
            cf.ThreadPoolExecutor(encoder.concurrency, thread_name_prefix="vqtok-encode") as encode_pool,
        ):
            buckets: dict[tuple[Any, ...], list[Prepared]] = {}  # same-shaped images of the current shard
            current = -1
            stream = prepared_stream(source, ranges, job.model, resize, decoders, window, decode_wait, chunk, work)
            for shard, p in stream:
                if shard != current:
                    for batch in buckets.values():
                        if batch:
                            submit(encode_pool, current, batch)
                    buckets, current = {}, shard
                if not p.ready:
                    buffers[shard].add_error(p.item.index, p.item.key, p.error or "unreadable")
                    stats["errors"] += 1
                    bar.update(1)
                    finish_if_done(shard)
                    continue
                key = p.pixels.shape if p.pixels is not None else ("files",)  # the client groups files by grid
                bucket = buckets.setdefault(key, [])
                bucket.append(p)
                if len(bucket) >= batch_size:
                    submit(encode_pool, shard, bucket)
                    buckets[key] = []
            for batch in buckets.values():
                if batch:
                    submit(encode_pool, current, batch)
            while in_flight:
                fut, s = in_flight.popleft()
                collect(fut, s)
            for shard in list(buffers):  # shards whose every item was unreadable
                finish_if_done(shard)
    except BrokenProcessPool as exc:  # a decoding process was killed (out of memory, a signal)
        bar.close()
        manifest.write_errors_file()
        raise TokenizeError(
            f"a decoding process died ({exc}); the {len(manifest.shards)} shards committed so far are kept: "
            "run the same command again to finish the job"
        ) from exc
    bar.close()
    manifest.write_errors_file()
    if not manifest.complete:
        raise TokenizeError(f"{len(manifest.pending())} shards did not complete")
    return Summary(
        str(output_dir),
        stats["images"],
        stats["errors"],
        stats["shards"],
        job.num_shards - len(pending),
        time.perf_counter() - t0,
        decode_wait_s=decode_wait[0],
        encode_wait_s=encode_wait[0],
        decode_pool=decode_pool,
    )


def read_tokens(output_dir: str | Path) -> pa.Table:
    """All committed rows of an output folder, in index order (a convenience for tests and users)."""
    out = Path(output_dir)
    body = json.loads((out / MANIFEST).read_text())
    files = [out / rec["file"] for _, rec in sorted(body["shards"].items())]
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("index")
