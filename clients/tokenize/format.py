"""The output format of a tokenization job: what is on disk, and nothing about how it gets there.

    part-00000.parquet ...   one row per image (`SCHEMA`), sorted by index; file metadata names the model
    manifest.json            the `Job` and every committed shard (`ShardRecord`); see `job.JobManifest`
    errors.jsonl             one `ErrorRecord` a line, rebuilt from the manifest

Shard k holds source items [k·S, (k+1)·S). A shard's file is written with fixed writer settings and
no timestamps, so the same rows give the same bytes on every run and on every engine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.core.artefacts import ModelInfo, sha256_file
from models.core.fileio import atomic_path

FORMAT = "vqtok-tokens/1"
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
DEFAULT_SHARD_SIZE = 4096
DEFAULT_BATCH_SIZE = 32

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("index", pa.int64()),
        ("tokens", pa.list_(pa.int32())),  # row-major h·w
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("source_h", pa.int32()),
        ("source_w", pa.int32()),
    ]
)


class TokenizeError(Exception):
    """A job that cannot run as asked (output folder of another job, unreadable input, ...)."""


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
    def from_info(cls, info: ModelInfo) -> ModelSpec:
        return cls(info.name, info.codebook_size, info.downsample, info.resolution, info.manifest_sha256, info.precision)


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


class ErrorRecord(TypedDict):
    """One unreadable (or refused) image: a line of errors.jsonl."""

    index: int
    key: str
    reason: str


class ShardRecord(TypedDict):
    """A committed shard, as manifest.json lists it."""

    file: str
    rows: int
    errors: list[ErrorRecord]
    sha256: str


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


@dataclass
class ShardBuffer:
    """Rows of one shard as they arrive (in any order); written sorted by index."""

    shard: int
    expected: int
    indices: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)  # int32 (h, w) each
    sources: list[tuple[int, int]] = field(default_factory=list)  # (height, width)
    errors: list[ErrorRecord] = field(default_factory=list)

    @property
    def received(self) -> int:
        return len(self.indices) + len(self.errors)

    @property
    def full(self) -> bool:
        return self.received == self.expected

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


def commit_shard(out_dir: Path, job: Job, buf: ShardBuffer) -> ShardRecord:
    """Write a complete shard's parquet file into `out_dir` atomically; returns what the manifest
    records of it (the manifest update is the second half of a commit: `job.JobManifest.commit`)."""
    if buf.received != buf.expected:
        raise RuntimeError(f"shard {buf.shard}: {buf.received} of {buf.expected} items; refusing to commit a partial shard")
    table = shard_table(buf, job)
    final = out_dir / shard_name(buf.shard)
    with atomic_path(final) as tmp:
        # fixed writer settings and no timestamps: the same rows give the same bytes on every run
        pq.write_table(table, tmp, compression="zstd", use_dictionary=["key"], write_statistics=True)
        digest = sha256_file(tmp)
    errors = sorted(buf.errors, key=lambda e: e["index"])
    return {"file": final.name, "rows": table.num_rows, "errors": errors, "sha256": digest}


def read_tokens(output_dir: str | Path) -> pa.Table:
    """All committed rows of an output folder, in index order (a convenience for tests and users)."""
    out = Path(output_dir)
    body = json.loads((out / MANIFEST).read_text())
    files = [out / rec["file"] for _, rec in sorted(body["shards"].items())]
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("index")
