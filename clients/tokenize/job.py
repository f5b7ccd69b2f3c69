"""The job flow, written once for every engine: plan → open the manifest → pending shards → rows into
per-shard buffers, each committed when complete → errors file → `Summary`.

    with JobRun.open(input_path, output_dir, spec, resize=..., shard_size=..., columns=...) as run:
        run.show_progress("tokenize NAME", progress)
        for each pending shard (run.ranges): produce rows → run.add(...) / run.add_error(...); run.advance(n)
    return run.summary(engine="...")

A row carries its item's `meta` (the input's other columns, `models.core.sources`) into the shard.

A shard is committed in two steps: its parquet file is renamed into place (`format.commit_shard`), then
the manifest is rewritten atomically with it listed. A re-run skips the shards the manifest lists and
redoes the rest, so a kill at any moment loses no image and duplicates none, and a re-run writes
byte-identical shards. Only the driver writes the manifest.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from models.core import pixels
from models.core.errors import InvalidInputError
from models.core.fileio import atomic_write, is_temporary
from models.core.sources import Columns, Meta, Source, open_source

from .format import (
    DEFAULT_MAX_TOKENS,
    ERRORS,
    JOB_DIR,
    LEGACY_ERRORS,
    LEGACY_MANIFEST,
    MANIFEST,
    SCHEMA,
    ErrorKind,
    Job,
    ModelSpec,
    ShardBuffer,
    ShardRecord,
    TokenizeError,
    commit_shard,
    error_kind,
    job_file,
    output_schema,
)
from .sequences import SequenceOptions, Sequencer, write_packed


def plan(
    input_path: str | Path,
    spec: ModelSpec,
    resize: str,
    shard_size: int,
    columns: Columns = None,
    sequences: SequenceOptions | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> tuple[Source, Job, Sequencer | None]:
    """The source to read, the job it makes and its LLM columns' sequencer; refuses a job that cannot
    run before anything is written. `columns`: the input's other columns to carry to the output (None:
    all; (): none); a caption column (`sequences`) is always carried."""
    if resize not in pixels.RESIZE_MODES:
        raise TokenizeError(f"unknown resize mode {resize!r}; expected one of {', '.join(pixels.RESIZE_MODES)}")
    if shard_size < 1:
        raise TokenizeError(f"shard size must be positive, got {shard_size}")
    caption = sequences.caption_column if sequences is not None else None
    if caption is not None and columns is not None and caption not in columns:
        columns = (*columns, caption)
    source = open_source(input_path, columns=columns)
    if len(source) == 0:
        raise TokenizeError(f"no images found in {input_path}")
    sequencer = None
    if sequences is not None:
        sequencer = sequences.plan(spec.codebook_size, spec.downsample, max_tokens, source.columns)
    record = sequencer.spec.to_json() if sequencer is not None else None
    job = Job(source.kind, len(source), source.fingerprint(), shard_size, resize, spec, source.columns, record)
    return source, job, sequencer


class JobManifest:
    """`__vqtok__/job.json` of an output folder: the job and its committed shards. Only the driver writes it."""

    def __init__(self, out_dir: Path, job: Job, input_path: str, shards: dict[int, ShardRecord]) -> None:
        self.out_dir, self.job, self.input_path, self.shards = out_dir, job, input_path, shards

    @classmethod
    def open(cls, out_dir: Path, job: Job, input_path: str, overwrite: bool = False) -> JobManifest:
        """Resume the job in `out_dir` (refused when the folder holds another job's output, unless
        `overwrite`), or start it there."""
        (out_dir / JOB_DIR).mkdir(parents=True, exist_ok=True)
        path = job_file(out_dir, MANIFEST)  # the legacy manifest.json of an output begun before JOB_DIR
        shards: dict[int, ShardRecord] = {}
        if path.exists() and not overwrite:
            try:
                body = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise TokenizeError(f"{path} is unreadable ({exc}); remove it or pass --overwrite") from exc
            there = body.get("job")
            if isinstance(there, dict):
                there.setdefault("columns", [])  # written before columns were carried: none were
                there.setdefault("sequences", None)  # written before the LLM columns: none
            if there != job.to_json():
                raise TokenizeError(
                    f"{out_dir} holds the output of a different job (input, model, resize, carried columns, layout or shard "
                    f"size differ): use another --output, or --overwrite to start over\n  there: {json.dumps(there)}\n"
                    f"  now:   {json.dumps(job.to_json())}"
                )
            for k, rec in body.get("shards", {}).items():
                if (out_dir / rec["file"]).exists():  # a committed shard whose file was deleted is redone
                    for e in rec["errors"]:
                        e.setdefault("kind", error_kind(e["reason"]))
                    shards[int(k)] = rec
        job_files = {name.rpartition("/")[2] for name in (MANIFEST, ERRORS)} | {LEGACY_MANIFEST, LEGACY_ERRORS}
        for folder in (out_dir, out_dir / JOB_DIR):  # leftovers of an interrupted write of this folder's files
            for stale in folder.glob(".*.tmp-*"):
                final = stale.name[1:].partition(".tmp-")[0]
                if is_temporary(stale) and (final.startswith("part-") or final in job_files):
                    stale.unlink(missing_ok=True)
        manifest = cls(out_dir, job, input_path, shards)
        if overwrite:
            for old in out_dir.glob("part-*.parquet"):
                old.unlink()
        manifest._write()
        for legacy in (LEGACY_MANIFEST, LEGACY_ERRORS):  # moved into JOB_DIR (the errors file is rewritten from the manifest)
            (out_dir / legacy).unlink(missing_ok=True)
        return manifest

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.job.num_shards

    def pending(self) -> list[int]:
        return [k for k in range(self.job.num_shards) if k not in self.shards]

    def commit(self, shard: int, record: ShardRecord) -> None:
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
        atomic_write(self.out_dir / MANIFEST, json.dumps(body, indent=1) + "\n")

    def write_errors_file(self) -> None:
        lines = [json.dumps(e) + "\n" for k in sorted(self.shards) for e in self.shards[k]["errors"]]
        atomic_write(self.out_dir / ERRORS, "".join(lines))


@dataclass
class Summary:
    output: str
    images: int  # tokenized in this run
    errors: int  # not tokenized in this run: unreadable + refused
    shards_written: int
    shards_skipped: int  # already committed by an earlier run
    seconds: float
    engine: str = "local"
    # where the local engine's driver thread waited: for decoded images (decoding is the bottleneck)
    # or for the encoder (the model is); both small means the driver's own work bounds the run
    decode_wait_s: float = 0.0
    encode_wait_s: float = 0.0
    decode_pool: str = ""  # the local engine's decoding workers: thread or process
    unreadable: int = 0  # missing or undecodable (a truncated file, not an image)
    refused: int = 0  # readable, but over the size limits or the wrong shape for resize none
    # start-up against steady state: seconds until the first encoded rows reached the driver (Ray:
    # the cluster's start and the actors' model load), and the rate from then on (rows per second)
    first_result_s: float = 0.0
    steady_rows_per_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors_file(self) -> str:
        return str(Path(self.output) / ERRORS)


class ProgressLines:
    """Progress where no terminal shows a bar (CI, `nohup`, a notebook's captured stderr): one plain line
    every `every_s` seconds (and a last one), so that long work is never silent."""

    def __init__(self, total: int, desc: str, every_s: float = 10.0, stream: Any = None) -> None:
        self.total, self.desc, self.every_s = total, desc, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        rate = self.n / max(now - self._start, 1e-9)
        share = f" ({100 * self.n / self.total:.1f} %)" if self.total else ""
        eta = f", about {(self.total - self.n) / rate:.0f} s left" if rate > 0 and self.total > self.n else ""
        print(f"{self.desc}: {self.n}/{self.total} images{share}, {rate:.1f} images/s{eta}", file=self.stream, flush=True)

    def close(self) -> None:
        self._line(time.monotonic())


def progress_bar(total: int, desc: str, enabled: bool | None) -> Any:
    """A tqdm bar on a terminal (or when `enabled`), plain lines every few seconds elsewhere (`enabled`
    None), nothing when `enabled` is False."""
    if enabled is None and not sys.stderr.isatty():
        return ProgressLines(total, desc)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", smoothing=0.1, dynamic_ncols=True, disable=None if enabled is None else not enabled)


class JobRun:
    """One run of a job, whatever produces its rows: the pending shards, a buffer for each, the commit
    of a shard as soon as its last row (or error) arrives, the counts and the progress bar.

    As a context manager it closes the progress bar and rewrites errors.jsonl from the manifest on
    the way out, whether the run finished or not (what was committed stays committed)."""

    def __init__(
        self,
        output: str,
        source: Source,
        manifest: JobManifest,
        started: float,
        on_commit: Callable[[int], None] | None,
        sequencer: Sequencer | None = None,
        packed: bool = False,
    ) -> None:
        self.output, self.source, self.manifest, self.started = output, source, manifest, started
        self.job = manifest.job
        self.sequencer, self.packed = sequencer, packed
        llm = sequencer.spec.columns if sequencer is not None else ()
        self.schema = output_schema(source.carried_schema() if self.job.columns else None, llm)
        if sequencer is not None:
            self.schema = self.schema.with_metadata({**(self.schema.metadata or {}), **sequencer.metadata()})
        elif not self.job.columns:
            self.schema = SCHEMA
        self.ranges = [(k, *self.job.shard_range(k)) for k in manifest.pending()]  # (shard, start, end) still to do
        self.buffers = {k: ShardBuffer(k, end - start) for k, start, end in self.ranges}
        self.shards_skipped = self.job.num_shards - len(self.ranges)
        self.images = self.shards_written = 0  # committed in this run
        self.failed: dict[ErrorKind, int] = {"unreadable": 0, "refused": 0}
        self._on_commit = on_commit
        self._bar: Any = None
        self._first: tuple[float, int] | None = None  # when the first rows arrived, and how many
        self._advanced = 0

    @classmethod
    def open(
        cls,
        input_path: str | Path,
        output_dir: str | Path,
        spec: ModelSpec,
        *,
        resize: str,
        shard_size: int,
        columns: Columns = None,
        overwrite: bool = False,
        started: float | None = None,
        on_commit: Callable[[int], None] | None = None,
        sequences: SequenceOptions | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> JobRun:
        """Plan the job and open (resume, or start) its manifest in `output_dir`. `columns`: the
        input's columns to carry (None: all). `started`: the `time.perf_counter()` the run's seconds
        count from (default: now); `on_commit(shard)` is called after each commit. `sequences`: the
        LLM columns (a layout, captions) and the packed form (`clients.tokenize.sequences`)."""
        t0 = time.perf_counter() if started is None else started
        source, job, sequencer = plan(input_path, spec, resize, shard_size, columns, sequences, max_tokens)
        manifest = JobManifest.open(Path(output_dir), job, str(Path(input_path).resolve()), overwrite)
        packed = sequences is not None and sequences.packed
        return cls(str(output_dir), source, manifest, t0, on_commit, sequencer, packed)

    @property
    def total(self) -> int:
        """Items of the pending shards."""
        return sum(end - start for _, start, end in self.ranges)

    def show_progress(self, desc: str, enabled: bool | None) -> None:
        """A progress bar over the pending items (`enabled` None: only on a terminal)."""
        self._bar = progress_bar(self.total, desc, enabled)

    def advance(self, n: int) -> None:
        if self._first is None:
            self._first = (time.perf_counter(), n)
        self._advanced += n
        if self._bar is not None:
            self._bar.update(n)

    @property
    def errors(self) -> int:
        return sum(self.failed.values())

    def add(self, shard: int, index: int, key: str, tokens: np.ndarray, source: tuple[int, int], meta: Meta = ()) -> None:
        llm = None
        if self.sequencer is not None:
            try:
                llm = self.sequencer.row(tokens, meta)
            except InvalidInputError as exc:  # a grid over the layout's max_grid
                self.add_error(shard, index, key, f"{type(exc).__name__}: {exc}", "refused")
                return
        buf = self.buffers[shard]
        buf.add(index, key, tokens, source, meta, llm)
        if buf.full:
            self._commit(buf)

    def add_error(self, shard: int, index: int, key: str, reason: str, kind: ErrorKind = "unreadable") -> None:
        buf = self.buffers[shard]
        buf.add_error(index, key, reason, kind)
        if buf.full:
            self._commit(buf)

    def _commit(self, buf: ShardBuffer) -> None:
        self.manifest.commit(buf.shard, commit_shard(self.manifest.out_dir, self.job, buf, self.schema))
        del self.buffers[buf.shard]
        self.images += len(buf.indices)
        for e in buf.errors:
            self.failed[e["kind"]] += 1
        self.shards_written += 1
        if self._on_commit is not None:
            self._on_commit(buf.shard)

    def __enter__(self) -> JobRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.close()
        self.manifest.write_errors_file()

    def summary(self, engine: str = "local", *, decode_wait_s: float = 0.0, encode_wait_s: float = 0.0, decode_pool: str = "") -> Summary:
        """The run's `Summary`; TokenizeError when a shard is still pending. With `packed`, the job's
        packed form is written first, from every committed shard (`sequences.write_packed`)."""
        if not self.manifest.complete:
            raise TokenizeError(f"{len(self.manifest.pending())} shards did not complete")
        if self.packed and self.sequencer is not None:
            out = self.manifest.out_dir
            write_packed(out, [out / self.manifest.shards[k]["file"] for k in sorted(self.manifest.shards)], self.sequencer.spec)
        now = time.perf_counter()
        first_s, steady = 0.0, 0.0
        if self._first is not None:
            first_s = self._first[0] - self.started
            if now > self._first[0]:
                steady = (self._advanced - self._first[1]) / (now - self._first[0])
        return Summary(
            self.output,
            self.images,
            self.errors,
            self.shards_written,
            self.shards_skipped,
            now - self.started,
            engine,
            decode_wait_s,
            encode_wait_s,
            decode_pool,
            self.failed["unreadable"],
            self.failed["refused"],
            first_s,
            steady,
        )
