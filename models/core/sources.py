"""Datasets of images: folders (recursive), Hugging Face-style parquet, webdataset tar shards.

One reader for training, evaluation and dataset tokenization. A source is an ordered, indexable list
of images: item `i` always has the same key, so a job can be cut into fixed shards (items
[k·S, (k+1)·S)) that are recomputed identically after an interruption, and a training sampler can
address items by index. Listing a source reads names and sizes only; image bytes are read lazily.
Slices are small picklable objects, so worker processes (data loaders, Ray tasks) can read them
without the whole index.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from .errors import SourceError
from .pixels import IMAGE_EXTENSIONS

TAR_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in sorted(IMAGE_EXTENSIONS))
IMAGE_COLUMNS = ("image", "img", "jpg", "png")  # parquet columns looked for, in this order


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

    def __len__(self) -> int: ...
    def fingerprint(self) -> str: ...
    def slice(self, start: int, end: int) -> Iterable[RawItem]: ...
    def item(self, index: int) -> RawItem: ...


def _digest(lines: Iterable[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- folders
@dataclass(frozen=True)
class FolderSlice:
    root: str
    start: int
    files: tuple[str, ...]

    def __iter__(self) -> Iterator[RawItem]:
        for i, rel in enumerate(self.files):
            yield RawItem(self.start + i, rel, path=os.path.join(self.root, rel))


class FolderSource:
    """Every image file under `root`, recursively (hidden files and folders skipped), in sorted
    relative-path order."""

    kind = "folder"

    def __init__(self, root: Path) -> None:
        self.root = root
        files: list[tuple[str, int]] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                    full = os.path.join(dirpath, name)
                    files.append((Path(full).relative_to(root).as_posix(), os.path.getsize(full)))
        files.sort()
        self.files = tuple(f for f, _ in files)
        self._sizes = tuple(s for _, s in files)

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        return _digest(f"{f}\t{s}" for f, s in zip(self.files, self._sizes, strict=True))

    def slice(self, start: int, end: int) -> FolderSlice:
        return FolderSlice(str(self.root), start, self.files[start:end])

    def item(self, index: int) -> RawItem:
        return RawItem(index, self.files[index], path=os.path.join(self.root, self.files[index]))


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
    for batch in pf.iter_batches(batch_size=512, row_groups=groups, columns=[column]):
        col = batch.column(0)
        values = col.field("bytes") if is_struct else col
        lo, hi = max(seg.row_start - row, 0), min(seg.row_end - row, len(batch))
        for j in range(lo, hi):
            r = row + j
            data = values[j].as_py()
            key = f"{seg.rel}:{r}"
            index = seg.index_start + (r - seg.row_start)
            yield RawItem(index, key, data=data) if data else RawItem(index, key, error="no image bytes in this row")
        row += len(batch)
        if row >= seg.row_end:
            break


class ParquetSource:
    """Rows of one parquet file, or of every *.parquet under a folder (sorted), in row order."""

    kind = "parquet"

    def __init__(self, path: Path, column: str | None = None) -> None:
        import pyarrow.parquet as pq

        files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        self.root = path.parent if path.is_file() else path
        self.column = column
        self.files: list[tuple[str, str, int, int]] = []  # (path, relative name, rows, bytes)
        for f in files:
            pf = pq.ParquetFile(f)
            image_column(pf.schema_arrow, f, column)
            self.files.append((str(f), f.relative_to(self.root).as_posix(), pf.metadata.num_rows, f.stat().st_size))
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
                segments.append(ParquetSegment(file, rel, lo, hi, start, self.column))
                start += hi - lo
            k += 1
        return ParquetSlice(tuple(segments))

    def item(self, index: int) -> RawItem:
        """Random access (training): the first access to a file reads its whole image column."""
        k = bisect.bisect_right(self._starts, index) - 1
        if k not in self._rows:
            file, rel, n, _ = self.files[k]
            self._rows[k] = list(_read_segment(ParquetSegment(file, rel, 0, n, self._starts[k], self.column)))
        return self._rows[k][index - self._starts[k]]


# ---------------------------------------------------------------- webdataset tar shards
@dataclass(frozen=True)
class TarMember:
    tar: str
    key: str
    offset: int  # of the member's data in the (uncompressed) tar file
    size: int


@dataclass(frozen=True)
class TarSlice:
    start: int
    members: tuple[TarMember, ...]

    def __iter__(self) -> Iterator[RawItem]:
        handles: dict[str, BinaryIO] = {}
        try:
            for i, m in enumerate(self.members):
                f = handles.get(m.tar)
                if f is None:
                    f = handles[m.tar] = open(m.tar, "rb")  # noqa: SIM115 - closed in `finally`
                f.seek(m.offset)
                data = f.read(m.size)
                yield (
                    RawItem(self.start + i, m.key, data=data)
                    if len(data) == m.size
                    else RawItem(self.start + i, m.key, error="truncated tar member")
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
    """Samples of webdataset shards: one image per sample key (the first image member), shards sorted."""

    kind = "webdataset"

    def __init__(self, path: Path) -> None:
        tars = [path] if path.is_file() else sorted(path.rglob("*.tar"))
        root = path.parent if path.is_file() else path
        members: list[TarMember] = []
        for t in tars:
            rel, seen = t.relative_to(root).as_posix(), set()
            try:
                with tarfile.open(t, "r:") as tf:  # uncompressed only: members are read by seeking
                    for m in tf:
                        if not m.isfile():
                            continue
                        key, ext = sample_key(m.name)
                        if ext.rsplit(".", 1)[-1] in TAR_IMAGE_EXTENSIONS and key not in seen:
                            seen.add(key)
                            members.append(TarMember(str(t), f"{rel}/{key}", m.offset_data, m.size))
            except tarfile.TarError as exc:
                raise SourceError(f"{t}: not a readable uncompressed tar ({exc})") from exc
        self.members = tuple(members)

    def __len__(self) -> int:
        return len(self.members)

    def fingerprint(self) -> str:
        return _digest(f"{m.key}\t{m.size}" for m in self.members)

    def slice(self, start: int, end: int) -> TarSlice:
        return TarSlice(start, self.members[start:end])

    def item(self, index: int) -> RawItem:
        m = self.members[index]
        return RawItem(index, m.key, path=m.tar, offset=m.offset, size=m.size)


# ---------------------------------------------------------------- dispatch
def open_source(path: str | Path, image_column: str | None = None) -> FolderSource | ParquetSource | TarSource:
    """A folder of images, a parquet file/folder of parquet files, or a tar/folder of tar shards.
    `image_column`: the parquet column holding the images (default: the first of IMAGE_COLUMNS)."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"input {p} does not exist")
    if p.is_file():
        if p.suffix == ".parquet":
            return ParquetSource(p, image_column)
        if p.suffix == ".tar":
            return TarSource(p)
        raise SourceError(f"input file {p} is neither .parquet nor .tar; pass a folder of images, parquet files or tar shards")
    if any(p.rglob("*.parquet")):
        return ParquetSource(p, image_column)
    if any(p.rglob("*.tar")):
        return TarSource(p)
    return FolderSource(p)
