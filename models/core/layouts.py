"""Layouts: how a token grid becomes the flat id sequence an LLM reads, and back (issue 27).

A layout is fixed by four things: the vocabulary offset (the LLM id of image code 0), the codebook
size K, the largest grid side it is built for (`max_grid`) and a preset's structure. The service, the
clients, dataset tokenization and `vqtok vocab` all use this one implementation. Numpy only.

Id rule, the same for every preset, so that a request needs only the layout's name and the offset:
- image code k (0 <= k < K) is `offset + k`;
- the preset's special tokens follow the codes, at `offset + K + i`, in this fixed order:

      plain      (none)
      chameleon  boi, eoi
      lumina     boi, eoi, eol, then the resolution tokens h1, w1, h2, w2, ..., h{max_grid}, w{max_grid}
      emu3       boi, eoi, eol, eof, img

  The resolution tokens are interleaved (not h1..hN then w1..wN) so that no id depends on `max_grid`:
  a layout built for a larger grid is a superset of one built for a smaller grid, and a server's grid
  limit need not equal the one an LLM's tokenizer was extended with.

Structure of one image span of an h×w grid (c: an image id, `offset + code`, row by row):

      plain      c ... c                                        h·w ids, no delimiters: parsing needs the grid
      chameleon  boi c ... c eoi                                the grid is square unless given
      lumina     boi h<h> w<w> (c ... c eol) × h eoi            any aspect ratio
      emu3       boi text("h*w") img (c ... c eol) × h eof eoi  the size as text, in the text tokenizer's ids

Sources (each preset reproduces its model's structure; the ids are this module's rule):
- Chameleon: transformers `models/chameleon/processing_chameleon.py` (image start `<racm3:break>`, the
  image tokens, image end `<eoss>`; no row separators). Show-o's `soi, ids + len(text tokenizer), eoi`
  is the same structure with the offset set to the text vocabulary size; LlamaGen's is `plain`, offset 0.
- Lumina-mGPT: Alpha-VLLM/Lumina-mGPT `lumina_mgpt/data/item_processor.py`
  (`FlexARItemProcessor.process_image`: start token, a height and a width token, each row of ids
  followed by the new-line token, end token). Its size tokens count 32-pixel patches of its own
  tokenizer; here they count the grid's rows and columns.
- Emu3: baaivision/Emu3 `emu3/mllm/processing_emu3.py` (`Emu3Processor.__call__`: boi, the prefix
  template `"{H}*{W}"` as text, img, the rows joined by eol, then eol, eof, eoi: every row ends with
  eol) and `emu3/mllm/utils_emu3.py` (its constrained decoding: every (w+1)-th id is eol, then eof, eoi).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InvalidInputError

TextIds = Callable[[str], Sequence[int]]  # text -> the text tokenizer's ids, without BOS/EOS

# The special tokens of each preset, in id order (before the resolution tokens).
PRESETS: dict[str, tuple[str, ...]] = {
    "plain": (),
    "chameleon": ("boi", "eoi"),
    "lumina": ("boi", "eoi", "eol"),
    "emu3": ("boi", "eoi", "eol", "eof", "img"),
}
LAYOUTS = tuple(PRESETS)
RESOLUTION_TOKENS = frozenset({"lumina"})  # presets with an h<n> and a w<n> token per grid side
DEFAULT_MAX_GRID = 128  # largest grid side when none is given: 1024 pixels at f8 (the service passes its own)
ANY_CODE = -1  # in a span template: any image id may stand here
SERVER_SIDE = ("plain", "chameleon", "lumina")  # what a layout named by its preset alone can build (emu3 needs text ids)
EMU3_NEEDS_TEXT = (
    "the emu3 layout writes each grid's size as text ('32*32') in the LLM's text tokenizer's ids, which a layout named "
    "by its preset alone does not have: pass a Layout built with them (vqtok.Client / LocalBackend encode_sequences and "
    "decode_sequence with layout=Layout('emu3', vocab_offset, codebook_size, text_ids=tokenizer) or "
    "read_layout('DIR/vqtok_vocab.json')), or run `vqtok tokenize --layout emu3 --text-tokenizer PATH/tokenizer.json` "
    "(or --vocab DIR/vqtok_vocab.json)"
)


class LayoutError(InvalidInputError):
    """A layout that cannot be built: unknown preset, bad offset, size or grid limit, emu3 without text ids."""


class SequenceError(InvalidInputError):
    """A malformed image span in an LLM's sequence (422 `invalid-sequence` on the service). The message
    names the span index, the position in the sequence and what is wrong; `span` and `position` carry
    them too, and are members of the service's problem body."""

    slug = "invalid-sequence"

    def __init__(self, message: str, *, span: int | None = None, position: int | None = None) -> None:
        extra = {k: v for k, v in (("span", span), ("position", position)) if v is not None}
        super().__init__(message, **extra)
        self.span = span
        self.position = position


@dataclass(frozen=True, eq=False)
class ImageSpan:
    """One image found in a sequence: `sequence[start:end]` is its span, `grid` its codes."""

    start: int  # position of the span's first id (boi; the first image id for plain)
    end: int  # one past its last id
    grid: np.ndarray  # int64 (h, w) image codes in [0, K)
    changes: tuple[str, ...] = ()  # what repair=True changed, in words; empty for a well-formed span

    @property
    def grid_hw(self) -> tuple[int, int]:
        return int(self.grid.shape[0]), int(self.grid.shape[1])


SHAPES_KEPT = 256  # grid shapes whose span template, code positions and size text a Layout remembers


def grid_side_limit(max_grid_tokens: int, max_image_pixels: int | None, downsample: int) -> int:
    """The largest grid side (h or w) that an encoder with these limits can produce or a decoder accept:
    a 1×s strip of s tokens, i.e. min(max_grid_tokens, max_image_pixels // f²). The service builds its
    layouts with this `max_grid` (with its defaults, 128² tokens and 4096² pixels, that is 16,384 at
    f = 8): every grid it encodes fits, and a lumina size token h<n>/w<n> keeps one id whatever the limit."""
    side = max_grid_tokens if max_image_pixels is None else min(max_grid_tokens, max_image_pixels // (downsample * downsample))
    return max(1, int(side))


def describe(layout: Layout) -> dict[str, Any]:
    """A short JSON description of a layout (what the service answers once per request): name, offset,
    K, max_grid, the image ids [start, stop) and the special ids by name. The resolution tokens of
    lumina are given by their rule, not listed: h<n> = special_ids["h1"] + 2(n - 1), w<n> = special_ids["w1"] + 2(n - 1)."""
    names = list(PRESETS[layout.name])  # the preset's own tokens (lumina's size tokens follow them, by rule)
    if layout.name in RESOLUTION_TOKENS:
        names += ["h1", "w1"]
    out: dict[str, Any] = {
        "name": layout.name,
        "vocab_offset": int(layout.vocab_offset),
        "codebook_size": int(layout.codebook_size),
        "max_grid": int(layout.max_grid),
        "image_ids": [layout.code_range.start, layout.code_range.stop],
        "special_ids": {n: layout.special_id(n) for n in names},
    }
    if layout.name in RESOLUTION_TOKENS:
        out["resolution_ids"] = "h<n> = h1 + 2(n-1), w<n> = w1 + 2(n-1), 1 <= n <= max_grid"
    return out


def as_text_ids(tokenizer: Any) -> TextIds:
    """A `text -> ids` callable from a text tokenizer: a `tokenizers.Tokenizer`, a transformers
    tokenizer (anything with `.encode(text, add_special_tokens=False)`), or a callable already."""
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):

        def text_ids(text: str) -> list[int]:
            out = encode(text, add_special_tokens=False)
            return [int(i) for i in getattr(out, "ids", out)]  # tokenizers returns an Encoding

        return text_ids
    if callable(tokenizer):
        return tokenizer
    raise LayoutError(f"text_ids must be a callable text -> ids or a tokenizer with .encode, got {type(tokenizer).__name__}")


@dataclass(frozen=True)
class Layout:
    """A token layout for an LLM: see the module docstring for the id rule and the presets' structures."""

    name: str  # preset: plain, chameleon, lumina or emu3
    vocab_offset: int  # the LLM id of image code 0
    codebook_size: int  # K: image code k is vocab_offset + k
    max_grid: int = DEFAULT_MAX_GRID  # largest grid side (h or w) built or parsed; lumina has size tokens up to it
    text_ids: Any = field(default=None, compare=False, repr=False)  # emu3: TextIds or a tokenizer, for the "h*w" text
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.name not in PRESETS:
            raise LayoutError(f"unknown layout {self.name!r}; expected one of {', '.join(LAYOUTS)}")
        for label, value, least in (("vocab_offset", self.vocab_offset, 0), ("codebook_size", self.codebook_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
                raise LayoutError(f"{label} must be an integer >= {least}, got {value!r}")
        if isinstance(self.max_grid, bool) or not isinstance(self.max_grid, int | np.integer) or self.max_grid < 1:
            raise LayoutError(f"max_grid must be an integer >= 1, got {self.max_grid!r}")
        if self.name == "emu3":
            if self.text_ids is None:
                raise LayoutError(
                    "the emu3 layout writes the grid size as text (e.g. '32*32') in the text tokenizer's ids: "
                    "give text_ids (a callable text -> ids, or the text tokenizer)"
                )
            object.__setattr__(self, "text_ids", as_text_ids(self.text_ids))
        names = PRESETS[self.name]
        if self.name in RESOLUTION_TOKENS:
            names += tuple(f"{axis}{n}" for n in range(1, self.max_grid + 1) for axis in ("h", "w"))
        base = self.vocab_offset + self.codebook_size
        self._cache["specials"] = {name: base + i for i, name in enumerate(names)}

    # --- ids ---

    @property
    def special_names(self) -> tuple[str, ...]:
        """The special tokens in id order (`offset + K + i`)."""
        return tuple(self._cache["specials"])

    def special_ids(self) -> dict[str, int]:
        """Every special id by name (boi, eoi, eol, eof, img, h1, w1, ...), in id order."""
        return dict(self._cache["specials"])

    def special_id(self, name: str) -> int:
        try:
            return int(self._cache["specials"][name])
        except KeyError:
            raise LayoutError(f"the {self.name} layout has no {name!r} token (it has: {', '.join(PRESETS[self.name]) or 'none'})") from None

    @property
    def code_range(self) -> range:
        """The LLM ids of the image codes."""
        return range(self.vocab_offset, self.vocab_offset + self.codebook_size)

    @property
    def vocab_size_needed(self) -> int:
        """The smallest LLM vocabulary that holds every id of this layout."""
        return self.vocab_offset + self.codebook_size + len(self._cache["specials"])

    def is_layout_id(self, ids: np.ndarray) -> np.ndarray:
        return (ids >= self.vocab_offset) & (ids < self.vocab_size_needed)

    def size_text_ids(self, h: int, w: int) -> tuple[int, ...]:
        """emu3: the text tokenizer's ids of "h*w" (checked to lie outside the layout's ids)."""

        def make() -> tuple[int, ...]:
            text = f"{h}*{w}"
            ids = tuple(int(i) for i in self.text_ids(text))
            if not ids or any(self.vocab_offset <= i < self.vocab_size_needed for i in ids):
                raise LayoutError(
                    f"the text tokenizer gives {list(ids)} for {text!r}: the size text must be text ids below the image ids "
                    f"(vocab_offset {self.vocab_offset} must be at least the text vocabulary size)"
                )
            return ids

        ids: tuple[int, ...] = self._per_shape(("text", h, w), make)
        return ids

    def _per_shape(self, key: tuple[Any, ...], make: Any) -> Any:
        """`make()`, remembered for the last SHAPES_KEPT shapes used (least recently used out first): a
        server's clients choose the grid shapes (resize=pad or none), so an unbounded cache would grow with them."""
        cache = self._cache
        if key in cache:
            value = cache.pop(key)
        else:
            value = make()
            stale = [k for k in cache if isinstance(k, tuple)]
            for old in stale[: max(0, len(stale) + 1 - SHAPES_KEPT)]:
                del cache[old]
        cache[key] = value  # last in the order: the most recently used
        return value

    # --- grid -> sequence ---

    def check_grid_hw(self, h: int, w: int) -> None:
        if not (1 <= h <= self.max_grid and 1 <= w <= self.max_grid):
            raise InvalidInputError(f"grid {h}x{w}: each side must be between 1 and {self.max_grid} (the layout's max_grid)")

    def span_template(self, h: int, w: int) -> np.ndarray:
        """The ids of one h×w image span, with `ANY_CODE` where an image id stands: the whole structure
        in one read-only int64 array, shared by building, parsing and constrained generation."""

        def make() -> np.ndarray:
            self.check_grid_hw(h, w)
            template = _build_template(self, h, w)
            template.flags.writeable = False
            return template

        template: np.ndarray = self._per_shape(("template", h, w), make)
        return template

    def code_positions(self, h: int, w: int) -> np.ndarray:
        """Where the h·w image ids sit in the span, row by row (read-only)."""

        def make() -> np.ndarray:
            positions = np.flatnonzero(self.span_template(h, w) == ANY_CODE)
            positions.flags.writeable = False
            return positions

        positions: np.ndarray = self._per_shape(("codes", h, w), make)
        return positions

    def span_length(self, h: int, w: int) -> int:
        return int(self.span_template(h, w).size)

    def to_sequence(self, grid: np.ndarray) -> np.ndarray:
        """Image codes (h, w) in [0, K) -> the span's LLM ids, int64 (L,)."""
        grid = np.asarray(grid)
        if grid.ndim != 2:
            raise InvalidInputError(f"expected one token grid (h, w), got shape {grid.shape}")
        return self.to_sequences(grid[None])[0]

    def to_sequences(self, grids: np.ndarray) -> np.ndarray:
        """A batch of same-size grids (B, h, w) -> int64 (B, L): one span per row, no per-token loop."""
        grids = np.asarray(grids)
        if grids.ndim != 3 or (grids.size and not np.issubdtype(grids.dtype, np.integer)):
            raise InvalidInputError(f"expected integer token grids (B, h, w), got {grids.dtype} {grids.shape}")
        b, h, w = grids.shape
        self.check_grid_hw(h, w)
        if grids.size and (int(grids.min()) < 0 or int(grids.max()) >= self.codebook_size):
            raise InvalidInputError(f"token ids must lie in [0, {self.codebook_size}), got [{int(grids.min())}, {int(grids.max())}]")
        out = np.repeat(self.span_template(h, w)[None], b, axis=0)
        out[:, self.code_positions(h, w)] = grids.reshape(b, h * w).astype(np.int64) + self.vocab_offset
        return out

    # --- sequence -> grids ---

    def grids_from_sequences(self, sequences: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
        """The inverse of `to_sequences`: (B, L) spans of h×w grids, each row exactly one span -> (B, h, w).
        Checked in bulk; a row that fails is parsed again by `find_spans` for an exact SequenceError."""
        sequences = np.asarray(sequences)
        h, w = grid_hw
        template = self.span_template(h, w)
        if sequences.ndim != 2 or sequences.shape[1] != template.size or not np.issubdtype(sequences.dtype, np.integer):
            raise InvalidInputError(
                f"expected integer sequences (B, {template.size}) of {h}x{w} spans, got {sequences.dtype} {sequences.shape}"
            )
        fixed = template != ANY_CODE
        codes = sequences[:, self.code_positions(h, w)].astype(np.int64) - self.vocab_offset
        bad = (sequences[:, fixed] != template[fixed]).any(axis=1) | ((codes < 0) | (codes >= self.codebook_size)).any(axis=1)
        if bad.any():
            row = int(np.argmax(bad))
            try:
                spans = self.find_spans(sequences[row], grid=grid_hw)
            except SequenceError as exc:
                raise SequenceError(f"sequence {row}: {exc}", span=exc.span, position=exc.position) from exc
            raise SequenceError(f"sequence {row}: expected exactly one {h}x{w} span, found {[s.grid_hw for s in spans]}")
        return codes.reshape(-1, h, w)

    def find_spans(
        self, sequence: Sequence[int] | np.ndarray, *, grid: tuple[int, int] | None = None, repair: bool = False
    ) -> list[ImageSpan]:
        """Every image span in an LLM's output; ids outside the layout are text and may surround them.

        Each span's structure is checked (boi/eoi pairing, the declared size against the rows, row
        lengths, ids in range); a malformed one raises SequenceError naming the span, the position and
        what is wrong. `repair=True` mends instead and lists what it changed on each span: ragged rows
        are padded by repeating the row's last id (as generation code pads) or cut, missing rows repeat
        the last row, ids that are not image ids are clamped into [0, K), a span without its eoi ends
        where the next begins (or at the end of the sequence).

        `grid` (h, w): needed for `plain`, which has no delimiters (a run of image ids must then be a
        whole number of h×w grids); for `chameleon` it is the size of every span (without it a span must
        hold a square number of ids); `lumina` and `emu3` declare their size in the span, and a `grid`
        given is checked against it.
        """
        seq = _as_ids(sequence)
        if grid is not None:
            self.check_grid_hw(*grid)
        if self.name == "plain":
            return _plain_spans(self, seq, grid, repair)
        bounds, notes = _pair_delimiters(self, seq, repair)
        _check_outside(self, seq, bounds, repair, notes)
        parse = _PARSERS[self.name]
        spans = []
        for i, (start, end, closed) in enumerate(bounds):
            span = _Span(self, seq, i, start, end, closed, repair, notes.get(i, []))
            codes = parse(span, grid)
            spans.append(ImageSpan(start, end, codes, tuple(span.changes)))
        return spans


def allowed_ids(layout: Layout, grid_hw: tuple[int, int], position: int) -> range:
    """The ids allowed at `position` (0 = the span's first id) of one image span of an h×w grid: the
    image ids, or the one special or size id the structure puts there. Walking the positions of a span
    reproduces `to_sequence`'s structure exactly, so a generating LLM masked to these ids can only
    emit well-formed images."""
    template = layout.span_template(*grid_hw)
    if not 0 <= position < template.size:
        raise IndexError(f"position {position} is outside a {grid_hw[0]}x{grid_hw[1]} span ({template.size} ids)")
    fixed = int(template[position])
    return layout.code_range if fixed == ANY_CODE else range(fixed, fixed + 1)


# --- building ---


def _build_template(layout: Layout, h: int, w: int) -> np.ndarray:
    rows = np.full((h, w), ANY_CODE, dtype=np.int64)
    if layout.name == "plain":
        return rows.ravel()
    sid = layout.special_id
    if layout.name == "chameleon":
        return np.concatenate([[sid("boi")], rows.ravel(), [sid("eoi")]]).astype(np.int64)
    closed_rows = np.concatenate([rows, np.full((h, 1), sid("eol"), dtype=np.int64)], axis=1).ravel()
    if layout.name == "lumina":
        head = [sid("boi"), sid(f"h{h}"), sid(f"w{w}")]
        tail = [sid("eoi")]
    else:  # emu3
        head = [sid("boi"), *layout.size_text_ids(h, w), sid("img")]
        tail = [sid("eof"), sid("eoi")]
    return np.concatenate([np.asarray(head, dtype=np.int64), closed_rows, np.asarray(tail, dtype=np.int64)])


# --- parsing ---


def _as_ids(sequence: Sequence[int] | np.ndarray) -> np.ndarray:
    seq = np.asarray(sequence)
    if seq.size == 0:
        return np.zeros(0, dtype=np.int64)
    if seq.ndim != 1 or not np.issubdtype(seq.dtype, np.integer) or seq.dtype == np.bool_:
        raise InvalidInputError(f"expected a 1-D sequence of integer ids, got {seq.dtype} {seq.shape}")
    return seq.astype(np.int64, copy=False)


def _pair_delimiters(layout: Layout, seq: np.ndarray, repair: bool) -> tuple[list[tuple[int, int, bool]], dict[int, list[str]]]:
    """(start, end, closed by its eoi) of each span, pairing boi and eoi in order; the loop runs over
    the delimiters only, never over the ids."""
    boi, eoi = layout.special_id("boi"), layout.special_id("eoi")
    bounds: list[tuple[int, int, bool]] = []
    notes: dict[int, list[str]] = {}
    strays: list[int] = []
    open_at: int | None = None
    for p in np.flatnonzero((seq == boi) | (seq == eoi)).tolist():
        i = len(bounds)
        if seq[p] == boi:
            if open_at is not None:
                if not repair:
                    raise SequenceError(
                        f"span {i} (boi at position {open_at}): no eoi before the next boi at position {p}", span=i, position=p
                    )
                notes.setdefault(i, []).append(f"no eoi: the span ends where the next boi begins (position {p})")
                bounds.append((open_at, p, False))
            open_at = p
        elif open_at is None:
            if not repair:
                raise SequenceError(f"span {i}: eoi at position {p} without a boi before it", span=i, position=p)
            strays.append(p)
        else:
            bounds.append((open_at, p + 1, True))
            open_at = None
    if open_at is not None:
        i = len(bounds)
        if not repair:
            raise SequenceError(
                f"span {i} (boi at position {open_at}): truncated, no eoi before the sequence ends at position {seq.size}",
                span=i,
                position=int(seq.size),
            )
        notes.setdefault(i, []).append(f"truncated: no eoi before the sequence ends at position {seq.size}")
        bounds.append((open_at, int(seq.size), False))
    for p in strays:  # reported on the span before the stray eoi (or the first one)
        i = max(0, sum(1 for start, _, _ in bounds if start < p) - 1)
        if bounds:
            notes.setdefault(i, []).append(f"ignored an eoi without a boi at position {p}")
    return bounds, notes


def _check_outside(layout: Layout, seq: np.ndarray, bounds: list[tuple[int, int, bool]], repair: bool, notes: dict[int, list[str]]) -> None:
    """Layout ids outside every span (image ids without a boi, a stray eol, ...) are malformed; an eoi
    without boi was handled when pairing."""
    inside = np.zeros(seq.size + 1, dtype=np.int64)
    for start, end, _ in bounds:
        inside[start] += 1
        inside[end] -= 1
    outside = (np.cumsum(inside[:-1]) == 0) & layout.is_layout_id(seq) & (seq != layout.special_id("eoi"))
    stray = np.flatnonzero(outside)
    if stray.size == 0:
        return
    p = int(stray[0])
    i = sum(1 for start, _, _ in bounds if start < p)
    what = f"{stray.size} layout id(s) outside any image span, the first {int(seq[p])} at position {p}"
    if not repair:
        raise SequenceError(f"span {i}: {what} (an image id, or a special token, without its boi)", span=i, position=p)
    if bounds:
        notes.setdefault(max(0, i - 1), []).append(f"ignored {what}")


class _Span:
    """The parse state of one delimited span: where it is, and the changes repair made to it."""

    def __init__(self, layout: Layout, seq: np.ndarray, index: int, start: int, end: int, closed: bool, repair: bool, notes: list[str]):
        self.layout, self.index, self.start, self.repair = layout, index, start, repair
        self.body_start = start + 1
        self.body = seq[start + 1 : end - 1 if closed else end]
        self.changes = list(notes)

    def fail(self, what: str, position: int) -> SequenceError:
        return SequenceError(
            f"span {self.index} (boi at position {self.start}): {what} at position {position}", span=self.index, position=position
        )

    def mend(self, what: str, position: int, fix: str) -> None:
        """Raise SequenceError(what, position) in strict mode; under repair, note what was wrong and the fix."""
        if not self.repair:
            raise self.fail(what, position)
        self.changes.append(f"{what} at position {position}: {fix}")

    def codes(self, ids: np.ndarray, first: int, skip: np.ndarray | None = None) -> np.ndarray:
        """Image ids -> codes in [0, K); an id that is not an image id (outside `skip`, a mask of
        separators) is an error, or clamped under repair."""
        codes = ids - self.layout.vocab_offset
        wrong = (codes < 0) | (codes >= self.layout.codebook_size)
        bad = np.flatnonzero(wrong if skip is None else wrong & ~skip)
        if bad.size:
            p = int(bad[0])
            what = f"{bad.size} id(s) that are not image ids {_code_text(self.layout)}, the first {int(ids[p])}"
            self.mend(what, first + p, f"clamped into [0, {self.layout.codebook_size})")
            codes = np.clip(codes, 0, self.layout.codebook_size - 1)
        return codes


def _code_text(layout: Layout) -> str:
    r = layout.code_range
    return f"[{r.start}, {r.stop})"


def _fit(row: np.ndarray, w: int) -> np.ndarray:
    """Pad by repeating the last id, or cut, to w ids."""
    if row.size >= w:
        return row[:w]
    return np.concatenate([row, np.full(w - row.size, row[-1], dtype=row.dtype)])


def _rows(span: _Span, region: np.ndarray, first: int, declared: tuple[int, int] | None) -> np.ndarray:
    """Rows each closed by eol -> codes (h, w), checked against the declared size (h, w)."""
    layout = span.layout
    eol = layout.special_id("eol")
    if declared is not None:  # the common case in one vectorised check
        h, w = declared
        if region.size == h * (w + 1):
            table = region.reshape(h, w + 1)
            if (table[:, w] == eol).all() and not (table[:, :w] == eol).any():
                return span.codes(table[:, :w].ravel(), first).reshape(h, w)
    separators = region == eol
    values = span.codes(region, first, skip=separators)
    ends = np.flatnonzero(separators)
    starts = np.concatenate([[0], ends + 1])
    codes = [values[a:b] for a, b in zip(starts[:-1].tolist(), ends.tolist(), strict=True)]
    if ends.size == 0 or ends[-1] != region.size - 1:
        tail = int(starts[-1])
        if region.size > tail:
            span.mend(f"row {len(codes)} is not closed by eol", first + region.size, "closed it")
            codes.append(values[tail:])
    if not codes:
        raise span.fail("no image rows", first)
    if declared is None:
        lengths = np.array([r.size for r in codes])
        h, w = len(codes), int(np.bincount(lengths).argmax())
        span.changes.append(f"took the grid size {h}x{w} from the rows")
        if not (1 <= h <= layout.max_grid and 1 <= w <= layout.max_grid):
            raise span.fail(f"the rows give a {h}x{w} grid, outside 1..{layout.max_grid} a side", first)
    else:
        h, w = declared
    if len(codes) != h:
        at = first + (int(starts[h]) if len(codes) > h else region.size)
        span.mend(f"declares {h} rows of {w} but has {len(codes)} rows", at, "cut" if len(codes) > h else "repeated the last row")
        codes = codes[:h] + [codes[-1]] * (h - len(codes))
    ragged = [r for r, c in enumerate(codes) if c.size != w]
    if ragged:
        r = ragged[0]
        span.mend(
            f"row {r} has {codes[r].size} ids, the width is {w}",
            first + int(starts[min(r, len(starts) - 1)]),
            f"padded by repeating the last id, or cut: rows {ragged[:8]}{'...' if len(ragged) > 8 else ''}",
        )
        fill = next((c for c in codes if c.size), None)
        if fill is None:
            raise span.fail("no image ids in any row", first)
        last = fill[-1:]
        for i, c in enumerate(codes):
            codes[i] = _fit(c if c.size else last, w)
            last = codes[i][-1:]
    return np.stack(codes)


def _parse_chameleon(span: _Span, grid: tuple[int, int] | None) -> np.ndarray:
    body, first = span.body, span.body_start
    if body.size == 0:
        raise span.fail("no image ids", first)
    codes = span.codes(body, first)
    if grid is None:
        side = math.isqrt(codes.size)
        if side * side != codes.size:
            raise span.fail(f"{codes.size} image ids are not a square grid (give the grid (h, w))", first + codes.size)
        if side > span.layout.max_grid:
            raise span.fail(f"{codes.size} image ids make a {side}x{side} grid, over max_grid {span.layout.max_grid}", first)
        grid = (side, side)
    h, w = grid
    if codes.size != h * w:
        span.mend(
            f"{codes.size} image ids for a {h}x{w} grid of {h * w}",
            first + min(codes.size, h * w),
            "cut" if codes.size > h * w else "padded by repeating the last id",
        )
        codes = _fit(codes, h * w)
    return codes.reshape(h, w)


def _declared_axis(span: _Span, axis: str, value: int, position: int) -> int | None:
    """lumina: the n of an h<n> / w<n> token, or None (an error unless repairing)."""
    layout = span.layout
    n = (value - layout.special_id("h1")) // 2 + 1
    if 1 <= n <= layout.max_grid and value == layout.special_id(f"{axis}{n}"):
        return n
    kind = "height" if axis == "h" else "width"
    span.mend(f"expected a {kind} token {axis}1..{axis}{layout.max_grid}, got {value}", position, "took the size from the rows")
    return None


def _parse_lumina(span: _Span, grid: tuple[int, int] | None) -> np.ndarray:
    body, first = span.body, span.body_start
    if body.size < 2:
        raise span.fail("no size tokens (expected h<n> w<n> after boi)", first + body.size)
    h = _declared_axis(span, "h", int(body[0]), first)
    w = _declared_axis(span, "w", int(body[1]), first + 1)
    declared = (h, w) if h is not None and w is not None else None
    if declared is not None and grid is not None and declared != tuple(grid):
        raise span.fail(f"declares {h}x{w}, expected {grid[0]}x{grid[1]}", first)
    return _rows(span, body[2:], first + 2, declared)


def _emu3_size(layout: Layout, prefix: np.ndarray, candidate: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) whose "h*w" text ids are `prefix`: the rows' own size first (one tokenizer call,
    cached), else a table of every size up to max_grid, built once per layout on first need."""
    ids = tuple(prefix.tolist())
    h, w = candidate
    if 1 <= h <= layout.max_grid and 1 <= w <= layout.max_grid and layout.size_text_ids(h, w) == ids:
        return candidate
    table = layout._cache.get("size_table")
    if table is None:
        sizes = range(1, layout.max_grid + 1)
        table = {layout.size_text_ids(a, b): (a, b) for a in sizes for b in sizes}
        layout._cache["size_table"] = table
    found: tuple[int, int] | None = table.get(ids)
    return found


def _parse_emu3(span: _Span, grid: tuple[int, int] | None) -> np.ndarray:
    layout = span.layout
    body, first = span.body, span.body_start
    img, eof, eol = layout.special_id("img"), layout.special_id("eof"), layout.special_id("eol")
    marks = np.flatnonzero(body == img)
    if marks.size:
        prefix_end = int(marks[0])
        rows_start = prefix_end + 1
    else:
        prefix_end = int(np.flatnonzero(layout.is_layout_id(body))[0]) if layout.is_layout_id(body).any() else body.size
        rows_start = prefix_end
        span.mend("no img marker after the size text", first + prefix_end, "added it")
    region = body[rows_start:]
    eofs = np.flatnonzero(region == eof)
    if eofs.size != 1 or eofs[0] != region.size - 1:
        at = first + rows_start + (int(eofs[0]) if eofs.size else region.size)
        if eofs.size:
            span.mend("expected one eof, just before the eoi", at, "dropped the ids after the first")
        else:
            span.mend("no eof before the eoi", at, "added it")
        if eofs.size:
            region = region[: int(eofs[0]) + 1]
    region = region[:-1] if region.size and region[-1] == eof else region
    ends = np.flatnonzero(region == eol)
    candidate = (int(ends.size), int(ends[0]) if ends.size else int(region.size))
    declared = _emu3_size(layout, body[:prefix_end], candidate)
    if declared is None:
        span.mend(
            f"the size text {body[:prefix_end].tolist()} is not the text of 'h*w' for any grid up to {layout.max_grid}",
            first,
            "took the size from the rows",
        )
    elif grid is not None and declared != tuple(grid):
        raise span.fail(f"declares {declared[0]}x{declared[1]}, expected {grid[0]}x{grid[1]}", first)
    return _rows(span, region, first + rows_start, declared)


_PARSERS: dict[str, Callable[[_Span, tuple[int, int] | None], np.ndarray]] = {
    "chameleon": _parse_chameleon,
    "lumina": _parse_lumina,
    "emu3": _parse_emu3,
}


def _runs(mask: np.ndarray) -> Iterable[tuple[int, int]]:
    """(start, end) of each run of True in a 1-D mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True)


def _plain_spans(layout: Layout, seq: np.ndarray, grid: tuple[int, int] | None, repair: bool) -> list[ImageSpan]:
    """plain has no delimiters: each run of image ids is a whole number of h×w grids."""
    if grid is None:
        raise InvalidInputError("the plain layout has no delimiters: parsing it needs the grid (h, w)")
    h, w = grid
    n = h * w
    spans: list[ImageSpan] = []
    for start, end in _runs(layout.is_layout_id(seq)):
        codes = seq[start:end] - layout.vocab_offset
        changes: tuple[str, ...] = ()
        if codes.size % n:
            what = f"a run of {codes.size} image ids is not a whole number of {h}x{w} grids ({n} ids each)"
            if not repair:
                i = len(spans) + codes.size // n
                raise SequenceError(
                    f"span {i}: {what} at position {start + codes.size // n * n}", span=i, position=start + codes.size // n * n
                )
            codes = _fit(codes, (codes.size // n + 1) * n)
            changes = (f"{what}: padded the last with its last id at position {end}",)
        for k in range(codes.size // n):
            last = k == codes.size // n - 1
            spans.append(
                ImageSpan(start + k * n, min(start + (k + 1) * n, end), codes[k * n : (k + 1) * n].reshape(h, w), changes if last else ())
            )
    return spans
