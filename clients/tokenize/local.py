"""The local engine: images read and decoded in this machine's worker threads or processes, encoded by a
`RuntimeEncoder` in this process or sent, as stored, to a running service by a `ServerEncoder`.

    pending shards ─▶ prepared_stream (decode pool, a bounded window ahead)
        ─▶ same-shaped batches ─▶ encode_batch (up to `encoder.concurrency` in flight) ─▶ JobRun
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .decoding import (
    DECODE_POOLS,
    PROCESS_CHUNK,
    DecodePool,
    Prepared,
    decode_executor,
    decode_items,
    decode_shared,
    prepared_stream,
    probe_items,
    shared_available,
    shared_prefix,
    sweep_shared,
)
from .encoders import Encoded, FileEncoder, PixelEncoder, encode_batch
from .format import DEFAULT_BATCH_SIZE, DEFAULT_MAX_TOKENS, DEFAULT_RESIZE, DEFAULT_SHARD_SIZE, TokenizeError
from .job import JobRun, Summary

if TYPE_CHECKING:
    from models.core.sources import Columns

    from .sequences import SequenceOptions


def tokenize_local(
    input_path: str | Path,
    output_dir: str | Path,
    encoder: PixelEncoder | FileEncoder,
    *,
    resize: str = DEFAULT_RESIZE,
    columns: Columns = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    decode_workers: int | None = None,
    decode_pool: DecodePool = "auto",
    overwrite: bool = False,
    progress: bool | None = None,
    on_commit: Callable[[int], None] | None = None,
    sequences: SequenceOptions | None = None,
) -> Summary:
    """Tokenize every image under `input_path` into `output_dir`, resuming a previous run there.

    `resize`: "crop" (default: short side to the model's resolution, centre square: one sequence
    length for every image), "pad" (whole images, edge-padded to a multiple of f) or "none" (sides
    must be multiples of f; others are refused). `columns`: the input's other columns to carry to
    the output (labels, captions; None: all of them, (): none). `max_tokens`: a larger token grid
    (none/pad: the image's own size) is refused; the server engine applies the server's limits.

    Decoding runs in a pool of `decode_workers` threads (Pillow and numpy release the GIL) or
    processes ("auto": the encoder's choice), up to a bounded window ahead of the encoder, so memory
    is bounded by the window, the batch and one shard's token ids. `on_commit(shard)` is called after
    each shard is committed. `sequences`: LLM columns (a layout's `sequence`; with a text tokenizer and
    a caption column, `text_ids` and `input_ids`) and the packed form (`clients.tokenize.sequences`)."""
    if decode_pool not in DECODE_POOLS:
        raise TokenizeError(f"unknown decode pool {decode_pool!r}; expected one of {', '.join(DECODE_POOLS)}")
    pool_kind = decode_pool if decode_pool != "auto" else ("process" if encoder.decode_pool == "process" else "thread")
    run = JobRun.open(
        input_path,
        output_dir,
        encoder.spec,
        resize=resize,
        shard_size=shard_size,
        columns=columns,
        overwrite=overwrite,
        on_commit=on_commit,
        sequences=sequences,
        max_tokens=max_tokens,
    )
    work: Callable[..., Any] = probe_items if isinstance(encoder, FileEncoder) else decode_items
    prefix = ""
    if work is decode_items and pool_kind == "process" and shared_available():
        prefix = shared_prefix()  # decoding processes hand their pixels over through tmpfs, not the pipe
        work = functools.partial(decode_shared, prefix=prefix)
    cpus = os.cpu_count() or 1
    if pool_kind == "process":  # the driver and the encoder's threads keep a core
        workers, chunk = decode_workers or max(1, cpus - 1), PROCESS_CHUNK
    else:
        workers, chunk = decode_workers or min(32, cpus + 2), 1
    # images decoding ahead of the encoder: two tasks a decoding process (four images a thread), so none waits
    window = max(4 * batch_size, (2 if chunk > 1 else 4) * workers * chunk)
    decode_wait, encode_wait = [0.0], [0.0]
    in_flight: deque[tuple[cf.Future[list[Encoded]], int]] = deque()

    def collect() -> None:
        fut, shard = in_flight.popleft()
        t = time.perf_counter()
        results = fut.result()
        encode_wait[0] += time.perf_counter() - t
        for p, tokens, error, kind in results:
            if tokens is None:
                run.add_error(shard, p.item.index, p.item.key, error or "encode failed", kind or "refused")
            else:
                run.add(shard, p.item.index, p.item.key, tokens, p.source, p.item.meta)
        run.advance(len(results))

    def submit(pool: cf.Executor, shard: int, batch: list[Prepared]) -> None:
        while len(in_flight) >= encoder.concurrency:
            collect()
        in_flight.append((pool.submit(encode_batch, encoder, batch, resize), shard))

    with run:
        run.show_progress(f"tokenize {run.job.model.name}", progress)
        try:
            with (
                decode_executor(pool_kind, workers) as decoders,
                cf.ThreadPoolExecutor(encoder.concurrency, thread_name_prefix="vqtok-encode") as encode_pool,
            ):
                buckets: dict[tuple[int, ...], list[Prepared]] = {}  # same-shaped images of the current shard
                current = -1
                stream = prepared_stream(
                    run.source, run.ranges, run.job.model, resize, decoders, window, decode_wait, chunk, work, max_tokens
                )
                for shard, p in stream:
                    if shard != current:
                        for batch in buckets.values():
                            if batch:
                                submit(encode_pool, current, batch)
                        buckets, current = {}, shard
                    if not p.ready:
                        run.add_error(shard, p.item.index, p.item.key, p.error or "unreadable", p.kind)
                        run.advance(1)
                        continue
                    key = p.pixels.shape if p.pixels is not None else ()  # files: one bucket (the client groups them by grid)
                    bucket = buckets.setdefault(key, [])
                    bucket.append(p)
                    if len(bucket) >= batch_size:
                        submit(encode_pool, shard, bucket)
                        buckets[key] = []
                for batch in buckets.values():
                    if batch:
                        submit(encode_pool, current, batch)
                while in_flight:
                    collect()
        except BrokenProcessPool as exc:  # a decoding process was killed (out of memory, a signal)
            raise TokenizeError(
                f"a decoding process died ({exc}); the {len(run.manifest.shards)} shards committed so far are kept: "
                "run the same command again to finish the job"
            ) from exc
        finally:
            if prefix:  # chunks decoded but never taken (the job failed or was interrupted), a killed worker's
                sweep_shared(prefix)
    return run.summary(decode_wait_s=decode_wait[0], encode_wait_s=encode_wait[0], decode_pool=pool_kind)
