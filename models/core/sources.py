"""Datasets of images: folders (recursive), Hugging Face-style parquet, webdataset tar shards.

One reader for training, evaluation and dataset tokenization. A source is an ordered, indexable list
of images: item `i` always has the same key, so a job can be cut into fixed shards (items
[k·S, (k+1)·S)) that are recomputed identically after an interruption, and a training sampler can
address items by index. Listing a source reads names and sizes only; image bytes are read lazily.
Slices are small picklable objects, so worker processes (data loaders, Ray tasks) can read them
without the whole index.

Besides its image, an item can carry the other fields of its sample (`RawItem.meta`), when the
source is opened with `columns` (None: every one there is; the default `()`: none, as training wants):
    parquet      every column other than the image column, values as stored (its arrow type kept)
    webdataset   every non-image member of the sample key (`abc.cls`, `abc.txt`, `abc.caption.txt`)
    folders      sidecar files beside an image (`cat.jpg` + `cat.txt`, `cat.json`, `cat.caption.txt`)
A member or sidecar becomes the column named by its extension (lower case): text extensions (`txt`,
`json`, ...) as strings (a JSON file as its text), `cls` as int64 when every value parses (else
strings), anything else as bytes. `Source.carried_schema()` gives the columns' arrow types, and the
input's schema metadata (parquet: e.g. the `classes` names of Hugging Face files).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from .errors import SourceError
from .pixels import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    import pyarrow as pa

TAR_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in sorted(IMAGE_EXTENSIONS))
IMAGE_COLUMNS = ("image", "img", "jpg", "png")  # parquet columns looked for, in this order
# carried members and sidecars, by the last part of their extension: text, or class indices (int64
# when every value of the column parses, else text); any other extension is carried as bytes
TEXT_EXTENSIONS = frozenset({"txt", "text", "caption", "json", "cls", "id", "url", "tags", "md"})
INT_EXTENSIONS = frozenset({"cls"})

Meta = tuple[tuple[str, Any], ...]  # (column, value) pairs, in the source's column order
Columns = Sequence[str] | None  # columns to carry: None every one there is, () none


@dataclass(frozen=True)
class RawItem:
    """One image as stored: its bytes, or where to read them (a file, or a span of one)."""

    index: int  # position in the source; shard k holds indices [k·S, (k+1)·S)
    key: str  # stable name: relative path, "file.parquet:row" or "shard.tar/sample"
    data: bytes | None = None
    path: str | None = None
    offset: int = 0  # with `path`: the bytes [offset, offset + size) of the file (a tar member)
    size: int = -1  # -1: to the end of the file
    error: str | None = None  # the stored item itself could not be read
    meta: Meta = ()  # the carried fields of its sample, in the source's `columns` order (None where missing)

    def read(self) -> bytes:
        if self.error is not None:
            raise OSError(self.error)
        if self.data is not None:
            return self.data
        if self.path is None:
            raise OSError(f"{self.key}: no bytes and no path")
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.size)
        if self.size >= 0 and len(data) != self.size:
            raise OSError(f"{self.key}: truncated ({len(data)} of {self.size} bytes)")
        return data


class Source(Protocol):
    kind: str
    columns: tuple[str, ...]  # the fields its items carry (`RawItem.meta`), in order

    def __len__(self) -> int: ...
    def fingerprint(self) -> str: ...
    def slice(self, start: int, end: int) -> Iterable[RawItem]: ...
    def item(self, index: int) -> RawItem: ...
    def carried_schema(self) -> pa.Schema: ...


def select_columns(available: Sequence[str], wanted: Columns, where: object) -> tuple[str, ...]:
    """The columns to carry: every available one (`wanted` None), or those asked for, in that order."""
    if wanted is None:
        return tuple(available)
    if isinstance(wanted, str):
        raise TypeError(f"columns must be a sequence of names, not the string {wanted!r}")
    missing = [c for c in wanted if c not in available]
    if missing:
        raise SourceError(f"{where}: no column {', '.join(map(repr, missing))} to carry; it has: {', '.join(available) or 'none'}")
    return tuple(dict.fromkeys(wanted))


def side_type(ext: str) -> str:
    """'string', 'int64' (a candidate: the source checks every value) or 'binary', by extension."""
    last = ext.rsplit(".", 1)[-1]
    if last in INT_EXTENSIONS:
        return "int64"
    return "string" if last in TEXT_EXTENSIONS else "binary"


def _parses_int(data: bytes) -> bool:
    try:
        int(data.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def meta_value(kind: str, data: bytes | None) -> Any:
    """The carried value of a member or sidecar's bytes, for its column type."""
    if data is None:
        return None
    if kind == "int64":
        try:
            return int(data.decode().strip())
        except (UnicodeDecodeError, ValueError):
            return None  # changed since listing
    return data.decode("utf-8", "replace") if kind == "string" else data


def side_schema(columns: Sequence[str], types: Sequence[str]) -> pa.Schema:
    import pyarrow as pa

    arrow = {"int64": pa.int64(), "string": pa.string(), "binary": pa.binary()}
    return pa.schema([pa.field(c, arrow[t]) for c, t in zip(columns, types, strict=True)])


def _read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _digest(lines: Iterable[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- folders
Sidecars = tuple[str | None, ...]  # per carried column: the sidecar's relative path, or None


@dataclass(frozen=True)
class FolderSlice:
    root: str
    start: int
    files: tuple[str, ...]
    sidecars: tuple[Sidecars, ...] = ()  # per file, when columns are carried
    columns: tuple[str, ...] = ()
    types: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[RawItem]:
        for i, rel in enumerate(self.files):
            yield _folder_item(self.root, self.start + i, rel, self.sidecars[i] if self.sidecars else (), self.columns, self.types)


def _folder_item(root: str, index: int, rel: str, sidecars: Sidecars, columns: tuple[str, ...], types: tuple[str, ...]) -> RawItem:
    meta = tuple(
        (c, meta_value(t, _read_file(os.path.join(root, side)) if side else None))
        for c, t, side in zip(columns, types, sidecars, strict=True)
    )
    return RawItem(index, rel, path=os.path.join(root, rel), meta=meta)


class FolderSource:
    """Every image file under `root`, recursively (hidden files and folders skipped), in sorted
    relative-path order. `columns`: the sidecars to carry, by extension (`cat.jpg` + `cat.txt`: "txt")."""

    kind = "folder"

    def __init__(self, root: Path, columns: Columns = ()) -> None:
        self.root = root
        files: list[tuple[str, int]] = []
        found: dict[str, dict[str, tuple[str, int]]] = {}  # image -> extension -> (sidecar, size)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            stems: dict[str, list[str]] = {}
            others: list[str] = []
            for name in filenames:
                if name.startswith("."):
                    continue
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    full = os.path.join(dirpath, name)
                    rel = Path(full).relative_to(root).as_posix()
                    files.append((rel, os.path.getsize(full)))
                    stems.setdefault(Path(name).stem, []).append(rel)
                else:
                    others.append(name)
            if columns is not None and not columns:
                continue
            for name in sorted(others):  # `cat.txt`, `cat.caption.txt` belong to `cat.jpg` (and `cat.png`)
                for i in (i for i, ch in enumerate(name) if ch == "." and i > 0):
                    ext = name[i + 1 :].lower()
                    for image in stems.get(name[:i], ()) if ext else ():
                        side = os.path.join(dirpath, name)
                        found.setdefault(image, {}).setdefault(ext, (Path(side).relative_to(root).as_posix(), os.path.getsize(side)))
        files.sort()
        self.files = tuple(f for f, _ in files)
        self._sizes = tuple(s for _, s in files)
        available = sorted({ext for sides in found.values() for ext in sides})
        self.columns = select_columns(available, columns, root)
        self._sidecars: tuple[tuple[tuple[str, int] | None, ...], ...] = (
            tuple(tuple(found.get(f, {}).get(c) for c in self.columns) for f in self.files) if self.columns else ()
        )
        self.types = tuple(self._infer(c, side_type(c), k) for k, c in enumerate(self.columns))

    def _infer(self, column: str, kind: str, k: int) -> str:
        if kind != "int64":
            return kind
        for sides in self._sidecars:
            side = sides[k]
            data = _read_file(os.path.join(self.root, side[0])) if side else None
            if data is not None and not _parses_int(data):
                return "string"
        return kind

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        if not self.columns:
            return _digest(f"{f}\t{s}" for f, s in zip(self.files, self._sizes, strict=True))
        return _digest(
            f"{f}\t{s}" + "".join(f"\t{c}:{side[1]}" for c, side in zip(self.columns, sides, strict=True) if side)
            for f, s, sides in zip(self.files, self._sizes, self._sidecars, strict=True)
        )

    def _paths(self, index: int) -> Sidecars:
        return tuple(side[0] if side else None for side in self._sidecars[index]) if self.columns else ()

    def slice(self, start: int, end: int) -> FolderSlice:
        sidecars = tuple(self._paths(i) for i in range(start, min(end, len(self.files)))) if self.columns else ()
        return FolderSlice(str(self.root), start, self.files[start:end], sidecars, self.columns, self.types)

    def item(self, index: int) -> RawItem:
        return _folder_item(str(self.root), index, self.files[index], self._paths(index), self.columns, self.types)

    def carried_schema(self) -> pa.Schema:
        return side_schema(self.columns, self.types)


# ---------------------------------------------------------------- parquet
def image_column(schema: object, path: Path, wanted: str | None = None) -> tuple[str, bool]:
    """(column name, is it the HF struct{bytes, path}) for the image column of a parquet file."""
    import pyarrow as pa

    assert isinstance(schema, pa.Schema)
    for name in (wanted,) if wanted else IMAGE_COLUMNS:
        if name in schema.names:
            t = schema.field(name).type
            if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
                return name, True
            if pa.types.is_binary(t) or pa.types.is_large_binary(t):
                return name, False
    expected = f"'{wanted}'" if wanted else "'image'"
    raise SourceError(
        f"{path}: no image column (expected {expected} as struct{{bytes, path}} or binary); columns: {', '.join(schema.names)}"
    )


@dataclass(frozen=True)
class ParquetSegment:
    file: str
    rel: str
    row_start: int  # rows [row_start, row_end) of this file
    row_end: int
    index_start: int  # global index of row_start
    column: str | None = None
    carry: tuple[str, ...] = ()  # the columns read into each item's `meta`


@dataclass(frozen=True)
class ParquetSlice:
    segments: tuple[ParquetSegment, ...]

    def __iter__(self) -> Iterator[RawItem]:
        for seg in self.segments:
            yield from _read_segment(seg)


def _read_segment(seg: ParquetSegment) -> Iterator[RawItem]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(seg.file)
    column, is_struct = image_column(pf.schema_arrow, Path(seg.file), seg.column)
    # only the row groups that overlap the wanted rows are read
    groups, first_row, row = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row < seg.row_end and row + n > seg.row_start:
            groups.append(g)
            first_row = row if first_row is None else first_row
        row += n
    row = first_row or 0
    for batch in pf.iter_batches(batch_size=512, row_groups=groups, columns=[column, *seg.carry]):
        col = batch.column(0)
        values = col.field("bytes") if is_struct else col
        lo, hi = max(seg.row_start - row, 0), min(seg.row_end - row, len(batch))
        carried = [batch.column(k + 1).slice(lo, max(hi - lo, 0)).to_pylist() for k in range(len(seg.carry))]
        for j in range(lo, hi):
            r = row + j
            data = values[j].as_py()
            key = f"{seg.rel}:{r}"
            index = seg.index_start + (r - seg.row_start)
            meta = tuple((c, carried[k][j - lo]) for k, c in enumerate(seg.carry))
            yield RawItem(index, key, data=data, meta=meta) if data else RawItem(index, key, error="no image bytes in this row", meta=meta)
        row += len(batch)
        if row >= seg.row_end:
            break


class ParquetSource:
    """Rows of one parquet file, or of every *.parquet under a folder (sorted), in row order."""

    kind = "parquet"

    def __init__(self, path: Path, column: str | None = None, columns: Columns = ()) -> None:
        import pyarrow.parquet as pq

        files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        self.root = path.parent if path.is_file() else path
        self.column = column
        self.files: list[tuple[str, str, int, int]] = []  # (path, relative name, rows, bytes)
        self._schema: pa.Schema | None = None  # the first file's: the carried columns' types and metadata
        available: list[str] = []
        for f in files:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            name, _ = image_column(schema, f, column)
            others = [n for n in schema.names if n != name]
            if self._schema is None:
                self._schema, available = schema, others
            else:  # a column is carried only when every file has it
                available = [n for n in available if n in others]
            self.files.append((str(f), f.relative_to(self.root).as_posix(), pf.metadata.num_rows, f.stat().st_size))
        self.columns = select_columns(available, columns, path)
        self._starts = [0]
        for _, _, n, _ in self.files:
            self._starts.append(self._starts[-1] + n)
        self._rows: dict[int, list[RawItem]] = {}  # file -> its items, for random access

    def __len__(self) -> int:
        return self._starts[-1]

    def fingerprint(self) -> str:
        return _digest(f"{rel}\t{n}\t{size}" for _, rel, n, size in self.files)

    def slice(self, start: int, end: int) -> ParquetSlice:
        segments = []
        k = bisect.bisect_right(self._starts, start) - 1
        while start < end and k < len(self.files):
            file, rel, n, _ = self.files[k]
            lo, hi = start - self._starts[k], min(end - self._starts[k], n)
            if hi > lo:
                segments.append(ParquetSegment(file, rel, lo, hi, start, self.column, self.columns))
                start += hi - lo
            k += 1
        return ParquetSlice(tuple(segments))

    def item(self, index: int) -> RawItem:
        """Random access (training): the first access to a file reads its whole image column."""
        k = bisect.bisect_right(self._starts, index) - 1
        if k not in self._rows:
            file, rel, n, _ = self.files[k]
            self._rows[k] = list(_read_segment(ParquetSegment(file, rel, 0, n, self._starts[k], self.column, self.columns)))
        return self._rows[k][index - self._starts[k]]

    def carried_schema(self) -> pa.Schema:
        """The carried columns as the first file types them, with its schema metadata."""
        import pyarrow as pa

        if self._schema is None:
            return pa.schema([])
        return pa.schema([self._schema.field(c) for c in self.columns], metadata=self._schema.metadata)


# ---------------------------------------------------------------- webdataset tar shards
Span = tuple[int, int]  # (offset, size) of a member's data in the tar file


@dataclass(frozen=True)
class TarMember:
    tar: str
    key: str
    offset: int  # of the member's data in the (uncompressed) tar file
    size: int
    extras: tuple[Span | None, ...] = ()  # the carried members of the sample, per carried column


def _read_span(f: BinaryIO, offset: int, size: int) -> bytes | None:
    f.seek(offset)
    data = f.read(size)
    return data if len(data) == size else None


def _tar_meta(f: BinaryIO, m: TarMember, columns: tuple[str, ...], types: tuple[str, ...]) -> Meta:
    return tuple((c, meta_value(t, _read_span(f, *span) if span else None)) for c, t, span in zip(columns, types, m.extras, strict=True))


@dataclass(frozen=True)
class TarSlice:
    start: int
    members: tuple[TarMember, ...]
    columns: tuple[str, ...] = ()
    types: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[RawItem]:
        handles: dict[str, BinaryIO] = {}
        try:
            for i, m in enumerate(self.members):
                f = handles.get(m.tar)
                if f is None:
                    f = handles[m.tar] = open(m.tar, "rb")  # noqa: SIM115 - closed in `finally`
                data = _read_span(f, m.offset, m.size)
                meta = _tar_meta(f, m, self.columns, self.types) if self.columns else ()
                yield (
                    RawItem(self.start + i, m.key, data=data, meta=meta)
                    if data is not None
                    else RawItem(self.start + i, m.key, error="truncated tar member", meta=meta)
                )
        finally:
            for f in handles.values():
                f.close()


def sample_key(name: str) -> tuple[str, str]:
    """webdataset convention: 'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg') (key ends at the first dot of the basename)."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


class TarSource:
    """Samples of webdataset shards: one image per sample key (the first image member), shards sorted.
    `columns`: the other members of a sample to carry, by extension (`abc.cls`: "cls")."""

    kind = "webdataset"

    def __init__(self, path: Path, columns: Columns = ()) -> None:
        tars = [path] if path.is_file() else sorted(path.rglob("*.tar"))
        root = path.parent if path.is_file() else path
        found: list[tuple[str, str, int, int, dict[str, Span]]] = []  # (tar, key, offset, size, extension -> span)
        available: set[str] = set()
        for t in tars:
            rel = t.relative_to(root).as_posix()
            images: dict[str, tuple[int, int]] = {}  # sample key -> the span of its first image member
            extras: dict[str, dict[str, Span]] = {}  # sample key -> extension -> span of its other members
            try:
                with tarfile.open(t, "r:") as tf:  # uncompressed only: members are read by seeking
                    for m in tf:
                        if not m.isfile():
                            continue
                        key, ext = sample_key(m.name)
                        if ext.rsplit(".", 1)[-1] in TAR_IMAGE_EXTENSIONS:
                            images.setdefault(key, (m.offset_data, m.size))
                        elif ext and (columns is None or len(columns) > 0):
                            extras.setdefault(key, {}).setdefault(ext, (m.offset_data, m.size))
            except tarfile.TarError as exc:
                raise SourceError(f"{t}: not a readable uncompressed tar ({exc})") from exc
            for key, (offset, size) in images.items():  # in the order of their first image member
                sample = extras.get(key, {})
                available.update(sample)
                found.append((str(t), f"{rel}/{key}", offset, size, sample))
        self.columns = select_columns(sorted(available), columns, path)
        self.members = tuple(
            TarMember(tar, key, offset, size, tuple(sample.get(c) for c in self.columns) if self.columns else ())
            for tar, key, offset, size, sample in found
        )
        self.types = tuple(self._infer(k, side_type(c)) for k, c in enumerate(self.columns))

    def _infer(self, k: int, kind: str) -> str:
        if kind != "int64":
            return kind
        handles: dict[str, BinaryIO] = {}
        try:
            for m in self.members:
                span = m.extras[k]
                if span is None:
                    continue
                f = handles.get(m.tar)
                if f is None:
                    f = handles[m.tar] = open(m.tar, "rb")  # noqa: SIM115 - closed in `finally`
                data = _read_span(f, *span)
                if data is not None and not _parses_int(data):
                    return "string"
        finally:
            for f in handles.values():
                f.close()
        return kind

    def __len__(self) -> int:
        return len(self.members)

    def fingerprint(self) -> str:
        if not self.columns:
            return _digest(f"{m.key}\t{m.size}" for m in self.members)
        return _digest(
            f"{m.key}\t{m.size}" + "".join(f"\t{c}:{span[1]}" for c, span in zip(self.columns, m.extras, strict=True) if span)
            for m in self.members
        )

    def slice(self, start: int, end: int) -> TarSlice:
        return TarSlice(start, self.members[start:end], self.columns, self.types)

    def item(self, index: int) -> RawItem:
        m = self.members[index]
        meta: Meta = ()
        if self.columns:
            with open(m.tar, "rb") as f:
                meta = _tar_meta(f, m, self.columns, self.types)
        return RawItem(index, m.key, path=m.tar, offset=m.offset, size=m.size, meta=meta)

    def carried_schema(self) -> pa.Schema:
        return side_schema(self.columns, self.types)


# ---------------------------------------------------------------- dispatch
def open_source(path: str | Path, image_column: str | None = None, columns: Columns = ()) -> FolderSource | ParquetSource | TarSource:
    """A folder of images, a parquet file/folder of parquet files, or a tar/folder of tar shards.
    `image_column`: the parquet column holding the images (default: the first of IMAGE_COLUMNS).
    `columns`: the other fields of each sample its items carry (None: all there are; default: none)."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"input {p} does not exist")
    if p.is_file():
        if p.suffix == ".parquet":
            return ParquetSource(p, image_column, columns)
        if p.suffix == ".tar":
            return TarSource(p, columns)
        raise SourceError(f"input file {p} is neither .parquet nor .tar; pass a folder of images, parquet files or tar shards")
    if any(p.rglob("*.parquet")):
        return ParquetSource(p, image_column, columns)
    if any(p.rglob("*.tar")):
        return TarSource(p, columns)
    return FolderSource(p, columns)
