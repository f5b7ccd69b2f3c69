"""LLM columns of a tokenization job (issue 27): each row's image as a layout's id sequence, its caption
in a text tokenizer's ids, and the two interleaved; and the packed form trainers read.

    vqtok tokenize --input shards/ --output out/ --layout lumina --vocab-offset 32000
    vqtok tokenize --input shards/ --output out/ --vocab llm/vqtok_vocab.json --caption-column txt --packed

Columns (list<int32>, after `SCHEMA`'s and before the carried ones):
    sequence   the image's span: `models.core.layouts.Layout.to_sequence` of its grid (image code k is
               vocab_offset + k, the layout's special tokens after the K codes)
    text_ids   with a text tokenizer and a caption column: the caption's ids (`add_special_tokens=False`:
               no BOS/EOS is added; a missing caption is empty)
    input_ids  text_ids then sequence (`--order text-first`, the default) or sequence then text_ids

They are computed on the driver, when a row reaches its shard, from the row's token grid and carried
caption: every engine (local, ray, server) writes the same ids, and a resumed job the same bytes.

Packed form (`--packed`), written when the job is complete, from the committed shards in index order,
into `OUT/__packed__/` (a folder pyarrow and `datasets` skip):
    input_ids.bin   every row's `input_ids` (`sequence` without captions) concatenated, little-endian
                    uint32, no separator: np.memmap(path, dtype=np.uint32, mode="r") reads the token
                    stream (nanoGPT-style: its train.bin with uint32 for vocabularies over 65,536)
    input_ids.idx   Megatron-LM's indexed-dataset index (`megatron/core/datasets/indexed_dataset.py`,
                    `_IndexWriter`), one document of one sequence per row:
                      9 bytes  b"MMIDIDX\\x00\\x00"
                      u64      version 1
                      u8       dtype code 4 (int32: Megatron has no uint32; every id is below 2^31, so
                               the .bin's uint32 bytes are the same int32 values)
                      u64      n, the number of sequences (rows)
                      u64      n + 1, the number of document indices
                      int32[n] sequence lengths in tokens
                      int64[n] byte offsets of the sequences in the .bin (4 · the running sum of the lengths)
                      int64[n + 1] document indices 0, 1, ..., n
                    so `IndexedDataset("OUT/__packed__/input_ids")` opens the pair, and numpy alone
                    does too (`read_packed`)
    input_ids.json  what was packed: rows, tokens, the column, dtype, the layout and the shards' sha256
Row i of the packed files is row i of the parquet dataset in index order (`read_tokens(out)`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from models.core.artefacts import sha256_file
from models.core.fileio import atomic_path, atomic_write
from models.core.layouts import LAYOUTS, Layout, LayoutError, describe, grid_side_limit
from models.core.sources import Meta

from .format import LLM_COLUMNS, TokenizeError

ORDERS = ("text-first", "image-first")
MAX_ID = 2**31 - 1  # int32 columns, and the packed index's int32 dtype
PACKED_DIR = "__packed__"  # skipped by pyarrow ("_") and by `datasets` ("__")
PACKED_NAME = "input_ids"
MEGATRON_HEADER = b"MMIDIDX\x00\x00"
MEGATRON_INT32 = 4  # megatron.core.datasets.indexed_dataset.DType.int32


@dataclass(frozen=True)
class SequenceSpec:
    """What a job records of its LLM columns (a resumed job must ask for the same)."""

    layout: str
    vocab_offset: int
    codebook_size: int
    max_grid: int
    text_tokenizer_sha256: str | None = None  # the tokenizer.json that gave text_ids (and emu3's size text)
    caption_column: str | None = None
    order: str = "text-first"

    @property
    def columns(self) -> tuple[str, ...]:
        return LLM_COLUMNS if self.caption_column else LLM_COLUMNS[:1]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SequenceOptions:
    """What the command line (or a caller) asks for; `plan` turns it into a `Sequencer` once the model is known."""

    layout: str | None = None  # a preset's name
    vocab_offset: int = 0
    vocab: str | Path | None = None  # vqtok_vocab.json or its folder (instead of layout and offset)
    text_tokenizer: str | Path | None = None  # tokenizer.json: captions, and emu3's size text
    caption_column: str | None = None
    order: str = "text-first"
    packed: bool = False

    def plan(self, codebook_size: int, downsample: int, max_tokens: int, carried: Sequence[str]) -> Sequencer:
        """The job's Sequencer, or TokenizeError saying what is missing or clashes."""
        from models.core.pixels import MAX_PIXELS
        from models.core.vocab import VocabError, load_text_tokenizer, read_layout

        if self.order not in ORDERS:
            raise TokenizeError(f"order must be one of {', '.join(ORDERS)}, not {self.order!r}")
        if (self.layout is None) == (self.vocab is None):
            raise TokenizeError("give a layout (--layout NAME, with --vocab-offset) or a vocabulary (--vocab DIR/vqtok_vocab.json)")
        if self.caption_column is not None and self.caption_column not in carried:
            raise TokenizeError(
                f"caption column {self.caption_column!r} is not among the input's carried columns ({', '.join(carried) or 'none'}): "
                "name one of them (webdataset and sidecar captions: txt), and do not leave it out with --columns/--no-columns"
            )
        tokenizer_path: Path | None = Path(self.text_tokenizer) if self.text_tokenizer is not None else None
        try:
            if self.vocab is not None:
                vocab = Path(self.vocab)
                folder = vocab if vocab.is_dir() else vocab.parent
                if tokenizer_path is None and (self.caption_column is not None or _vocab_layout(vocab) == "emu3"):
                    tokenizer_path = folder / "tokenizer.json"  # the extended tokenizer beside it
                text = load_text_tokenizer(tokenizer_path) if tokenizer_path is not None else None
                layout = read_layout(vocab, text_ids=text)
                if layout.codebook_size != codebook_size:
                    raise TokenizeError(f"{vocab}: built for K = {layout.codebook_size} codes; the model has {codebook_size}")
            else:
                if self.layout not in LAYOUTS:
                    raise TokenizeError(f"unknown layout {self.layout!r}; expected one of {', '.join(LAYOUTS)}")
                if self.layout == "emu3" and tokenizer_path is None:
                    raise TokenizeError(
                        "the emu3 layout writes each grid's size as text in the LLM's ids: give --text-tokenizer PATH/tokenizer.json "
                        "(or --vocab DIR/vqtok_vocab.json from `vqtok vocab extend`)"
                    )
                text = load_text_tokenizer(tokenizer_path) if tokenizer_path is not None else None
                side = grid_side_limit(max_tokens, MAX_PIXELS, downsample)
                layout = Layout(str(self.layout), vocab_offset=self.vocab_offset, codebook_size=codebook_size, max_grid=side, text_ids=text)
        except (VocabError, LayoutError) as exc:
            raise TokenizeError(str(exc)) from exc
        except ImportError as exc:  # tokenizers, the vqtok[llm] extra
            raise TokenizeError(str(exc)) from exc
        if self.caption_column is not None and text is None:
            raise TokenizeError("--caption-column needs a text tokenizer: --text-tokenizer PATH/tokenizer.json (or --vocab)")
        if self.caption_column is None and self.text_tokenizer is not None and layout.name != "emu3":
            raise TokenizeError("--text-tokenizer tokenizes captions: name their column with --caption-column (e.g. txt)")
        if layout.vocab_size_needed - 1 > MAX_ID:
            raise TokenizeError(f"the layout's largest id, {layout.vocab_size_needed - 1}, does not fit int32")
        spec = SequenceSpec(
            layout.name,
            layout.vocab_offset,
            layout.codebook_size,
            layout.max_grid,
            sha256_file(tokenizer_path) if tokenizer_path is not None and text is not None else None,
            self.caption_column,
            self.order,
        )
        return Sequencer(spec, layout, text)


def _vocab_layout(path: Path) -> str | None:
    from models.core.vocab import read_vocab

    try:
        return str(read_vocab(path).get("layout"))
    except Exception:  # read_layout reports it in its own words
        return None


class Sequencer:
    """Turns a row's grid and carried fields into its LLM columns."""

    def __init__(self, spec: SequenceSpec, layout: Layout, text_tokenizer: Any = None) -> None:
        self.spec, self.layout, self.text = spec, layout, text_tokenizer

    def row(self, grid: np.ndarray, meta: Meta) -> dict[str, np.ndarray]:
        """{column: int32 ids}; InvalidInputError (a grid over the layout's max_grid) refuses the row."""
        sequence = self.layout.to_sequence(grid)
        out = {"sequence": sequence.astype(np.int32)}
        if self.spec.caption_column is not None:
            caption = caption_text(dict(meta).get(self.spec.caption_column))
            text = np.asarray(self.text.encode(caption, add_special_tokens=False).ids, dtype=np.int32)
            out["text_ids"] = text
            parts = (text, out["sequence"]) if self.spec.order == "text-first" else (out["sequence"], text)
            out["input_ids"] = np.concatenate(parts)
        return out

    def metadata(self) -> dict[str, str]:
        """The shards' file metadata that describes the LLM columns."""
        record = describe(self.layout)
        return {
            "vqtok.layout": json.dumps(record, sort_keys=True),
            "vqtok.sequences": json.dumps(self.spec.to_json(), sort_keys=True),
        }


def caption_text(value: Any) -> str:
    """A carried caption as text: bytes as UTF-8, a missing one as empty."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


# --- the packed form ---


def packed_prefix(output_dir: str | Path) -> Path:
    return Path(output_dir) / PACKED_DIR / PACKED_NAME


def write_packed(output_dir: str | Path, shard_files: Sequence[Path], spec: SequenceSpec) -> Path:
    """`__packed__/input_ids.{bin,idx,json}` from the committed shards, in order (each shard is sorted by
    index, and shard k holds indices before shard k+1's). Written atomically; returns the prefix."""
    column = "input_ids" if spec.caption_column else "sequence"
    prefix = packed_prefix(output_dir)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    lengths: list[np.ndarray] = []
    with atomic_path(prefix.with_suffix(".bin")) as tmp, open(tmp, "wb") as out:
        for f in shard_files:
            col = pq.read_table(f, columns=[column]).column(column).combine_chunks()
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy(zero_copy_only=False)
            out.write(np.ascontiguousarray(values[offsets[0] : offsets[-1]], dtype="<u4").tobytes())
            lengths.append(np.diff(offsets).astype(np.int64))
    sizes = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    with atomic_path(prefix.with_suffix(".idx")) as tmp:
        tmp.write_bytes(megatron_index(sizes))
    record = {
        "format": "vqtok-packed/1",
        "column": column,
        "dtype": "uint32",
        "byteorder": "little",
        "rows": int(sizes.size),
        "tokens": int(sizes.sum()),
        "index": "Megatron-LM indexed dataset (MMIDIDX v1, dtype code 4 = int32, one document of one sequence per row)",
        "sequences": spec.to_json(),
        "shards": [{"file": f.name, "sha256": sha256_file(f)} for f in shard_files],
    }
    atomic_write(prefix.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    return prefix


def megatron_index(sizes: np.ndarray) -> bytes:
    """The .idx bytes of Megatron-LM's `_IndexWriter` for int32 tokens, one document per sequence."""
    n = int(sizes.size)
    if n and int(sizes.max()) > MAX_ID:
        raise TokenizeError("a row holds more than 2^31 ids")
    pointers = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(sizes[:-1] * 4, out=pointers[1:])
    head = MEGATRON_HEADER + struct.pack("<Q", 1) + struct.pack("<B", MEGATRON_INT32) + struct.pack("<Q", n) + struct.pack("<Q", n + 1)
    return b"".join([head, sizes.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(), np.arange(n + 1, dtype="<i8").tobytes()])


@dataclass
class Packed:
    """A packed output read back: `tokens` (the uint32 stream, memory-mapped), `offsets` (n + 1 token offsets)."""

    tokens: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return int(self.offsets.size - 1)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def read_packed(output_dir: str | Path) -> Packed:
    """`__packed__/input_ids.bin` and its Megatron index, read with numpy alone (the format in this module's docstring)."""
    prefix = packed_prefix(output_dir)
    index = prefix.with_suffix(".idx").read_bytes()
    if index[:9] != MEGATRON_HEADER or struct.unpack("<Q", index[9:17])[0] != 1 or index[17] != MEGATRON_INT32:
        raise TokenizeError(f"{prefix}.idx is not an int32 Megatron index (MMIDIDX v1)")
    n, _documents = struct.unpack("<QQ", index[18:34])
    sizes = np.frombuffer(index, dtype="<i4", count=n, offset=34)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    tokens = np.memmap(prefix.with_suffix(".bin"), dtype="<u4", mode="r") if offsets[-1] else np.zeros(0, np.uint32)
    return Packed(tokens, offsets)
