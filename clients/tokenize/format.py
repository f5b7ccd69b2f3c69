"""The output format of a tokenization job: what is on disk, and nothing about how it gets there.

    part-00000.parquet ...   one row per image (`output_schema`: `SCHEMA` + the carried columns),
                             sorted by index; file metadata names the model
    __vqtok__/job.json       the `Job` and every committed shard (`ShardRecord`); see `job.JobManifest`
    __vqtok__/errors.jsonl   one `ErrorRecord` a line, rebuilt from the manifest

The job files sit in a folder that dataset readers skip (pyarrow skips names starting with "_" or
".", Hugging Face `datasets` folders starting with "__"), so `pq.read_table(out)`, `pd.read_parquet(out)`,
`pyarrow.dataset.dataset(out)` and `datasets.load_dataset("parquet", data_dir=out)` open the folder
as it is. Outputs written before that folder existed hold `manifest.json` and `errors.jsonl` at the
top; they are read (`job_file`) and moved on resume.

Shard k holds source items [k·S, (k+1)·S). A shard's file is written with fixed writer settings and
no timestamps, so the same rows give the same bytes on every run and on every engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.core.artefacts import ModelInfo, sha256_file
from models.core.fileio import atomic_path
from models.core.sources import Meta

FORMAT = "vqtok-tokens/1"
JOB_DIR = "__vqtok__"  # skipped by pyarrow ("_" prefix) and by `datasets` ("__" prefix)
MANIFEST = f"{JOB_DIR}/job.json"
ERRORS = f"{JOB_DIR}/errors.jsonl"
LEGACY_MANIFEST, LEGACY_ERRORS = "manifest.json", "errors.jsonl"  # the layout before JOB_DIR
DEFAULT_SHARD_SIZE = 4096
DEFAULT_BATCH_SIZE = 32
DEFAULT_RESIZE = "crop"  # fixed-length sequences at the model's native size, from every readable image
DEFAULT_MAX_TOKENS = 256 * 256  # a larger token grid (resize none/pad: the image's own size) is refused

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
CARRIED_PREFIX = "input_"  # a carried column named like one of SCHEMA's (or the LLM columns) is written as input_<name>
# With a layout (`sequences`), these list<int32> columns follow SCHEMA's: `sequence`; with captions, `text_ids` and `input_ids`.
LLM_COLUMNS = ("sequence", "text_ids", "input_ids")


def llm_columns(sequences: dict[str, Any] | None) -> tuple[str, ...]:
    """The LLM columns a job's `sequences` record asks for (none without a layout)."""
    if not sequences:
        return ()
    return LLM_COLUMNS if sequences.get("caption_column") else LLM_COLUMNS[:1]


ErrorKind = Literal["unreadable", "refused"]
# what an error's reason starts with (the exception's name) when the image was refused rather than
# unreadable: its size or shape (pixel rule), or the encoder's / the server's refusal
REFUSED_REASONS = (
    "ImageTooLarge",
    "ImageShapeError",
    "InvalidInputError",
    "ValueError",
    "PayloadTooLargeError",
    "ValidationError",
)


def error_kind(reason: str) -> ErrorKind:
    """The kind of an error from its reason (for records written before errors had a kind)."""
    return "refused" if reason.startswith(REFUSED_REASONS) else "unreadable"


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
    columns: tuple[str, ...] = ()  # the input's columns carried to the output, in order
    sequences: dict[str, Any] | None = field(default=None, hash=False)  # the LLM columns' layout and text (`sequences.SequenceSpec`)

    @property
    def num_shards(self) -> int:
        return -(-self.num_items // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_items)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "columns": list(self.columns), "format": FORMAT, "num_shards": self.num_shards}


class ErrorRecord(TypedDict):
    """One image not tokenized: a line of errors.jsonl. `kind`: "unreadable" (missing, undecodable)
    or "refused" (too large, or the wrong shape for resize none)."""

    index: int
    key: str
    reason: str
    kind: ErrorKind


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
    metas: list[Meta] = field(default_factory=list)  # the carried fields of each row
    llm: list[dict[str, np.ndarray]] = field(default_factory=list)  # each row's LLM columns (int32), with a layout
    errors: list[ErrorRecord] = field(default_factory=list)

    @property
    def received(self) -> int:
        return len(self.indices) + len(self.errors)

    @property
    def full(self) -> bool:
        return self.received == self.expected

    def add(
        self, index: int, key: str, tokens: np.ndarray, source: tuple[int, int], meta: Meta = (), llm: dict[str, np.ndarray] | None = None
    ) -> None:
        self.indices.append(index)
        self.keys.append(key)
        self.tokens.append(tokens)
        self.sources.append(source)
        self.metas.append(meta)
        if llm is not None:
            self.llm.append(llm)

    def add_error(self, index: int, key: str, reason: str, kind: ErrorKind = "unreadable") -> None:
        self.errors.append({"index": index, "key": key, "reason": reason, "kind": kind})


def carried_name(name: str, llm: Sequence[str] = ()) -> str:
    """The output name of a carried input column (`llm`: the job's LLM columns, which it must not shadow)."""
    return CARRIED_PREFIX + name if name in SCHEMA.names or name in llm else name


def _hf_features(raw: bytes, renamed: dict[str, str]) -> bytes | None:
    """Hugging Face `datasets` metadata cut to the carried columns (a ClassLabel keeps its names)."""
    try:
        features = json.loads(raw)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return None
    kept = {renamed[c]: features[c] for c in renamed if isinstance(features, dict) and c in features}
    return json.dumps({"info": {"features": kept}}, sort_keys=True).encode() if kept else None


def output_schema(carried: pa.Schema | None = None, llm: Sequence[str] = ()) -> pa.Schema:
    """`SCHEMA` + the LLM columns `llm` + the carried columns (renamed by `carried_name`), with the
    input's schema metadata that still describes them: e.g. the `classes` names of a Hugging Face
    parquet; `datasets` features cut to the carried columns; never pandas' index description or an
    earlier vqtok's keys."""
    llm_fields = [pa.field(name, pa.list_(pa.int32())) for name in llm]
    if carried is None or not len(carried):
        return pa.schema([*SCHEMA, *llm_fields]) if llm else SCHEMA
    renamed = {f.name: carried_name(f.name, llm) for f in carried}
    metadata: dict[bytes, bytes] = {}
    for k, v in (carried.metadata or {}).items():
        name = k.decode("utf-8", "replace")
        if name == "pandas" or name.startswith(("ARROW:", "vqtok.")):
            continue
        if name == "huggingface":
            cut = _hf_features(v, renamed)
            if cut is not None:
                metadata[k] = cut
            continue
        metadata[k] = v
    fields = [*SCHEMA, *llm_fields, *(f.with_name(renamed[f.name]) for f in carried)]
    return pa.schema(fields, metadata=metadata or None)


def _list_column(arrays: Sequence[np.ndarray]) -> pa.Array:
    """int32 arrays -> one list<int32> column, without a per-row conversion."""
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise TokenizeError("a shard holds 2^31 ids or more in one column: use a smaller --shard-size")
    values = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int32()))


def shard_table(buf: ShardBuffer, job: Job, schema: pa.Schema = SCHEMA) -> pa.Table:
    order = np.argsort(np.asarray(buf.indices, dtype=np.int64), kind="stable")
    toks = [buf.tokens[i] for i in order]
    columns = [
        pa.array([buf.keys[i] for i in order], pa.string()),
        pa.array(np.asarray(buf.indices, dtype=np.int64)[order]),
        _list_column(toks),
        pa.array([t.shape[0] for t in toks], pa.int32()),
        pa.array([t.shape[1] for t in toks], pa.int32()),
        pa.array([buf.sources[i][0] for i in order], pa.int32()),
        pa.array([buf.sources[i][1] for i in order], pa.int32()),
    ]
    llm = llm_columns(job.sequences)
    for name in llm:
        columns.append(_list_column([buf.llm[i][name] for i in order]))
    first_carried = len(SCHEMA) + len(llm)
    if len(schema) > first_carried:
        rows = [dict(buf.metas[i]) for i in order]
        carried = [schema.field(k) for k in range(first_carried, len(schema))]
        for name, f in zip(job.columns, carried, strict=True):
            columns.append(pa.array([r.get(name) for r in rows], f.type))
    m = job.model
    metadata: dict[bytes | str, bytes | str] = {
        **(schema.metadata or {}),
        "vqtok.format": FORMAT,
        "vqtok.model": m.name,
        "vqtok.manifest_sha256": m.manifest_sha256,
        "vqtok.codebook_size": str(m.codebook_size),
        "vqtok.downsample": str(m.downsample),
        "vqtok.precision": m.precision,
        "vqtok.resize": job.resize,
        "vqtok.shard": str(buf.shard),
    }
    return pa.Table.from_arrays(columns, schema=schema.with_metadata(metadata))


def commit_shard(out_dir: Path, job: Job, buf: ShardBuffer, schema: pa.Schema = SCHEMA) -> ShardRecord:
    """Write a complete shard's parquet file into `out_dir` atomically; returns what the manifest
    records of it (the manifest update is the second half of a commit: `job.JobManifest.commit`).
    `schema`: the job's `output_schema`."""
    if buf.received != buf.expected:
        raise RuntimeError(f"shard {buf.shard}: {buf.received} of {buf.expected} items; refusing to commit a partial shard")
    table = shard_table(buf, job, schema)
    final = out_dir / shard_name(buf.shard)
    with atomic_path(final) as tmp:
        # fixed writer settings and no timestamps: the same rows give the same bytes on every run
        pq.write_table(table, tmp, compression="zstd", use_dictionary=["key"], write_statistics=True)
        digest = sha256_file(tmp)
    errors = sorted(buf.errors, key=lambda e: e["index"])
    return {"file": final.name, "rows": table.num_rows, "errors": errors, "sha256": digest}


def job_file(out_dir: Path, name: str) -> Path:
    """`MANIFEST` or `ERRORS` in `out_dir`, or its legacy name where only that exists (an output
    written before the job folder)."""
    path = out_dir / name
    legacy = out_dir / {MANIFEST: LEGACY_MANIFEST, ERRORS: LEGACY_ERRORS}[name]
    return legacy if not path.exists() and legacy.exists() else path


def _shard_files(output_dir: str | Path) -> list[Path]:
    out = Path(output_dir)
    body = json.loads(job_file(out, MANIFEST).read_text())
    return [out / rec["file"] for _, rec in sorted(body["shards"].items())]


def read_tokens(output_dir: str | Path) -> pa.Table:
    """All committed rows of an output folder, in index order (a convenience for tests and users)."""
    files = _shard_files(output_dir)
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("index")


@dataclass
class TokenDataset:
    """An output folder in numpy: `grids[i]` is image i's (h, w) int32 token grid; `columns` the
    carried columns (numeric ones without nulls as numpy arrays, others as lists); `metadata` the
    shards' schema metadata (the model, `vqtok.*`, and what the input's held, e.g. `classes`)."""

    keys: list[str]
    indices: np.ndarray  # int64 (n,): positions in the source
    grids: list[np.ndarray]  # int32 (h, w) each
    source_sizes: np.ndarray  # int32 (n, 2): (height, width) of each image before resizing
    columns: dict[str, np.ndarray | list[Any]]
    metadata: dict[str, str]
    sequences: dict[str, list[np.ndarray]] = field(default_factory=dict)  # the LLM columns (int32 ids per row), with a layout

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Row i: key, index, grid, source size and the carried columns."""
        row: dict[str, Any] = {"key": self.keys[i], "index": int(self.indices[i]), "grid": self.grids[i]}
        row["source_size"] = (int(self.source_sizes[i, 0]), int(self.source_sizes[i, 1]))
        row |= {name: values[i] for name, values in self.sequences.items()}
        return row | {name: values[i] for name, values in self.columns.items()}

    def stacked(self) -> np.ndarray:
        """int32 (n, h, w): every grid, when all have one shape (resize crop); ValueError otherwise."""
        shapes = {g.shape for g in self.grids}
        if len(shapes) > 1:
            raise ValueError(f"grids of {len(shapes)} shapes (resize pad or none); index `grids` instead")
        return np.stack(self.grids) if self.grids else np.zeros((0, 0, 0), np.int32)

    @property
    def classes(self) -> list[str] | None:
        """The class names of a Hugging Face-style input (schema metadata `classes`), if it had them."""
        text = self.metadata.get("classes")
        return text.split(",") if text else None


def _column_values(col: pa.ChunkedArray) -> np.ndarray | list[Any]:
    t = col.type
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
    if numeric and col.null_count == 0:
        return col.to_numpy()
    return col.to_pylist()


def load_tokens(output_dir: str | Path, columns: Sequence[str] | None = None) -> TokenDataset:
    """An output folder's committed rows, in index order, as numpy token grids and the carried
    columns (`columns`: only these; default all)."""
    table = read_tokens(output_dir)
    files = _shard_files(output_dir)
    metadata = {k.decode(): v.decode() for k, v in (pq.read_schema(files[0]).metadata or {}).items()} if files else {}
    metadata.pop("vqtok.shard", None)
    llm = llm_columns(json.loads(metadata["vqtok.sequences"])) if "vqtok.sequences" in metadata else ()
    carried = [n for n in table.schema.names[len(SCHEMA) + len(llm) :] if columns is None or n in columns]
    gh, gw = table.column("grid_h").to_numpy(), table.column("grid_w").to_numpy()
    grids = [g.reshape(int(gh[i]), int(gw[i])) for i, g in enumerate(_lists(table.column("tokens")))]
    sizes = np.stack([table.column("source_h").to_numpy(), table.column("source_w").to_numpy()], axis=1).astype(np.int32)
    return TokenDataset(
        table.column("key").to_pylist(),
        table.column("index").to_numpy().astype(np.int64),
        grids,
        sizes.reshape(-1, 2),
        {n: _column_values(table.column(n)) for n in carried},
        metadata,
        {n: _lists(table.column(n)) for n in llm},
    )


def _lists(col: pa.ChunkedArray) -> list[np.ndarray]:
    """A list<int32> column as one int32 array per row (views of one buffer)."""
    combined = col.combine_chunks()
    offsets, values = combined.offsets.to_numpy(), combined.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(combined))]
