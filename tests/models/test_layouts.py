"""models.core.layouts: the id rule, grid <-> sequence round trips, malformed spans (strict and repaired),
and allowed_ids against the sequences the layouts build."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from models.core.errors import InvalidInputError
from models.core.layouts import LAYOUTS, Layout, LayoutError, SequenceError, allowed_ids

OFFSET, K, MAX_GRID = 1000, 50, 8
GRIDS = [(3, 5), (1, 1), (7, 2)]


def text_ids(text: str) -> list[int]:
    """A stand-in text tokenizer: one id per character, all below the layout's offset."""
    return [ord(c) for c in text]


def layout(name: str, **kw: int) -> Layout:
    args = {"vocab_offset": OFFSET, "codebook_size": K, "max_grid": MAX_GRID, **kw}
    return Layout(name, text_ids=text_ids if name == "emu3" else None, **args)


def grid_of(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, K, size=(h, w))


def parse_grid(name: str, hw: tuple[int, int]) -> tuple[int, int] | None:
    """plain needs the grid, chameleon takes it (its spans need not be square); the others declare it."""
    return hw if name in ("plain", "chameleon") else None


# --- the id rule ---


@pytest.mark.parametrize(
    ("name", "first"),
    [
        ("plain", ()),
        ("chameleon", ("boi", "eoi")),
        ("lumina", ("boi", "eoi", "eol", "h1", "w1", "h2", "w2")),
        ("emu3", ("boi", "eoi", "eol", "eof", "img")),
    ],
)
def test_special_ids_follow_the_codes_in_the_documented_order(name: str, first: tuple[str, ...]) -> None:
    lay = layout(name)
    ids = lay.special_ids()
    assert tuple(ids)[: len(first)] == first
    assert list(ids.values()) == list(range(OFFSET + K, OFFSET + K + len(ids)))
    assert lay.vocab_size_needed == OFFSET + K + len(ids)
    assert lay.code_range == range(OFFSET, OFFSET + K)
    if name == "lumina":
        assert len(ids) == 3 + 2 * MAX_GRID and tuple(ids)[-2:] == (f"h{MAX_GRID}", f"w{MAX_GRID}")


def test_resolution_ids_do_not_depend_on_max_grid() -> None:
    """A tokenizer extended for a smaller grid agrees with a server built for a larger one."""
    small, large = layout("lumina", max_grid=4).special_ids(), layout("lumina", max_grid=64).special_ids()
    assert all(large[name] == i for name, i in small.items())
    g = grid_of(3, 4)
    assert (layout("lumina", max_grid=4).to_sequence(g) == layout("lumina", max_grid=64).to_sequence(g)).all()


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("hw", GRIDS)
def test_round_trip_with_text_around_two_images(name: str, hw: tuple[int, int]) -> None:
    lay = layout(name)
    a, b = grid_of(*hw, seed=1), grid_of(*hw, seed=2)
    sa, sb = lay.to_sequence(a), lay.to_sequence(b)
    assert sa.dtype == np.int64 and sa.ndim == 1
    assert (sa[lay.code_positions(*hw)] == a.ravel() + OFFSET).all()  # code k is offset + k, row by row
    seq = np.concatenate([[1, 2, 3], sa, [4, 5, 999], sb, [6]])
    spans = lay.find_spans(seq, grid=parse_grid(name, hw))
    assert [(s.start, s.end) for s in spans] == [(3, 3 + sa.size), (6 + sa.size, 6 + sa.size + sb.size)]
    assert (spans[0].grid == a).all() and (spans[1].grid == b).all()
    assert spans[0].changes == () and spans[1].changes == ()
    assert lay.find_spans([1, 2, 3], grid=parse_grid(name, hw)) == []


@pytest.mark.parametrize(
    ("name", "hw", "expected"),
    [
        ("chameleon", (1, 2), [1050, 1000 + 7, 1000 + 9, 1051]),
        ("lumina", (1, 2), [1050, 1053, 1056, 1007, 1009, 1052, 1051]),  # boi h1 w2 c c eol eoi
        ("emu3", (1, 2), [1050, ord("1"), ord("*"), ord("2"), 1054, 1007, 1009, 1052, 1053, 1051]),  # boi "1*2" img c c eol eof eoi
        ("plain", (1, 2), [1007, 1009]),
    ],
)
def test_structure_by_hand(name: str, hw: tuple[int, int], expected: list[int]) -> None:
    assert layout(name).to_sequence(np.array([[7, 9]])).tolist() == expected


@pytest.mark.parametrize("name", LAYOUTS)
def test_batched_helpers_match_one_by_one(name: str) -> None:
    lay = layout(name)
    grids = np.stack([grid_of(7, 2, seed=s) for s in range(5)])
    seqs = lay.to_sequences(grids)
    assert (seqs == np.stack([lay.to_sequence(g) for g in grids])).all()
    assert (lay.grids_from_sequences(seqs, (7, 2)) == grids).all()
    seqs[3, -1] = 5  # a text id where the span's last id belongs
    with pytest.raises(SequenceError, match="sequence 3"):
        lay.grids_from_sequences(seqs, (7, 2))


def test_bad_grids_and_layouts_are_clear_errors() -> None:
    lay = layout("lumina")
    with pytest.raises(InvalidInputError, match=r"\[0, 50\)"):
        lay.to_sequence(np.array([[0, 50]]))
    with pytest.raises(InvalidInputError, match="max_grid"):
        lay.to_sequence(np.zeros((MAX_GRID + 1, 1), dtype=np.int64))
    with pytest.raises(InvalidInputError, match=r"\(h, w\)"):
        lay.to_sequence(np.zeros(4, dtype=np.int64))
    with pytest.raises(LayoutError, match="unknown layout 'llava'"):
        Layout("llava", vocab_offset=0, codebook_size=K)
    with pytest.raises(LayoutError, match="text_ids"):
        Layout("emu3", vocab_offset=OFFSET, codebook_size=K)
    with pytest.raises(LayoutError, match="vocab_offset"):
        Layout("plain", vocab_offset=-1, codebook_size=K)
    clash = Layout("emu3", vocab_offset=40, codebook_size=K, text_ids=text_ids)  # ord("*") = 42 is an image id here
    with pytest.raises(LayoutError, match="text vocabulary size"):
        clash.to_sequence(np.zeros((1, 1), dtype=np.int64))
    with pytest.raises(InvalidInputError, match="needs the grid"):
        layout("plain").find_spans([1000, 1001])


# --- malformed spans ---
# Three 3x5 images with text between; span 1 is broken. Positions are relative to span 1's boi (b1).

H, W = 3, 5
Mutation = Callable[[np.ndarray, Layout], np.ndarray]


def rows_at(name: str) -> int:
    """Where the first row starts in a 3x5 span: after boi h w (lumina), boi "3*5" img (emu3)."""
    return {"chameleon": 1, "lumina": 3, "emu3": 5}[name]


def delete(*positions: int) -> Mutation:
    return lambda s, lay: np.delete(s, list(positions))


def put(position: int, value: Callable[[Layout], int]) -> Mutation:
    def mutate(s: np.ndarray, lay: Layout) -> np.ndarray:
        s = s.copy()
        s[position] = value(lay)
        return s

    return mutate


def three_images(name: str, mutate: Mutation) -> tuple[Layout, np.ndarray, list[np.ndarray], int]:
    lay = layout(name)
    grids = [grid_of(H, W, seed=s) for s in range(3)]
    spans = [lay.to_sequence(g) for g in grids]
    spans[1] = mutate(spans[1], lay)
    parts = [np.array([5, 6]), spans[0], np.array([7]), spans[1], np.array([8, 9]), spans[2], np.array([10])]
    b1 = 2 + spans[0].size + 1
    return lay, np.concatenate(parts), grids, b1


def span1_cases() -> list[tuple[str, str, Mutation, str, int]]:
    """(preset, case, mutation of span 1, what the message says, position relative to b1)."""
    cases: list[tuple[str, str, Mutation, str, int]] = []
    for name in ("chameleon", "lumina", "emu3"):
        r0 = rows_at(name)
        stride = W + 1 if name != "chameleon" else W
        cases.append((name, "id out of range", put(r0 + 1, lambda lay: 7), "not image ids", r0 + 1))
        cases.append((name, "id above the layout", put(r0 + 1, lambda lay: lay.vocab_size_needed + 3), "not image ids", r0 + 1))
        if name == "chameleon":
            cases.append((name, "too few ids", delete(5), "14 image ids for a 3x5 grid", 1 + 14))
            continue
        cases.append((name, "ragged row", delete(r0 + stride + 4), "row 1 has 4 ids, the width is 5", r0 + stride))
        cases.append((name, "row too long", lambda s, lay, r0=r0: np.insert(s, r0 + 2, OFFSET + 3), "row 0 has 6 ids", r0))
        cases.append(
            (name, "missing row", delete(*range(r0 + 2 * stride, r0 + 3 * stride)), "declares 3 rows of 5 but has 2 rows", r0 + 2 * stride)
        )
        cases.append((name, "unclosed row", delete(r0 + 3 * stride - 1), "row 2 is not closed by eol", r0 + 3 * stride - 1))
    cases.append(("lumina", "h/w mismatch", put(1, lambda lay: lay.special_id("h4")), "declares 4 rows of 5 but has 3 rows", 3 + 18))
    cases.append(("lumina", "no height token", put(1, lambda lay: OFFSET + 1), "expected a height token", 1))
    emu_size = (lambda s, lay: np.concatenate([s[:1], text_ids("4*5"), s[4:]]),)[0]
    cases.append(("emu3", "h/w mismatch", emu_size, "declares 4 rows of 5 but has 3 rows", 5 + 18))
    cases.append(("emu3", "missing eof", delete(5 + 18), "no eof before the eoi", 5 + 18))
    cases.append(("emu3", "missing img", delete(4), "no img marker", 4))
    return cases


@pytest.mark.parametrize(("name", "case", "mutate", "message", "at"), span1_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_span_names_span_and_position(name: str, case: str, mutate: Mutation, message: str, at: int) -> None:
    lay, seq, grids, b1 = three_images(name, mutate)
    with pytest.raises(SequenceError) as info:
        lay.find_spans(seq, grid=(H, W) if name == "chameleon" else None)
    text = str(info.value)
    assert message in text
    assert f"span 1 (boi at position {b1})" in text and f"at position {b1 + at}" in text
    assert (info.value.span, info.value.position) == (1, b1 + at)
    spans = lay.find_spans(seq, grid=(H, W) if name == "chameleon" else None, repair=True)
    assert len(spans) == 3
    assert (spans[0].grid == grids[0]).all() and (spans[2].grid == grids[2]).all()
    assert spans[0].changes == () and spans[2].changes == ()
    assert spans[1].grid.shape == ((4, 5) if case == "h/w mismatch" else (H, W))
    assert spans[1].changes and any(f"position {b1 + at}" in c for c in spans[1].changes)


@pytest.mark.parametrize("name", ["lumina", "emu3"])
def test_repair_pads_cuts_and_clamps_as_documented(name: str) -> None:
    r0 = rows_at(name)
    lay, seq, grids, _ = three_images(name, delete(r0 + 6 + 4))  # row 1 loses its last id
    fixed = lay.find_spans(seq, repair=True)[1].grid
    expected = grids[1].copy()
    expected[1, 4] = expected[1, 3]  # padded by repeating the row's last id
    assert (fixed == expected).all()
    lay, seq, grids, _ = three_images(name, put(r0 + 1, lambda lay: 7))
    fixed = lay.find_spans(seq, repair=True)[1].grid
    expected = grids[1].copy()
    expected[0, 1] = 0  # a text id (below the offset) clamps to code 0
    assert (fixed == expected).all()
    lay, seq, grids, _ = three_images(name, delete(*range(r0 + 12, r0 + 18)))
    fixed = lay.find_spans(seq, repair=True)[1].grid
    assert (fixed[:2] == grids[1][:2]).all() and (fixed[2] == grids[1][1]).all()  # the missing row repeats the last one
    lay, seq, grids, _ = three_images(name, lambda s, lay: np.insert(s, r0 + 2, OFFSET + 3))  # row 0 gets an extra id
    fixed = lay.find_spans(seq, repair=True)[1].grid
    assert (fixed[0] == [grids[1][0, 0], grids[1][0, 1], 3, grids[1][0, 2], grids[1][0, 3]]).all()  # cut to the width


@pytest.mark.parametrize("name", ["chameleon", "lumina", "emu3"])
def test_delimiter_errors(name: str) -> None:
    grid = (H, W) if name == "chameleon" else None
    lay, seq, grids, b1 = three_images(name, lambda s, lay: s[:-1])  # span 1 loses its eoi
    b2 = b1 + lay.span_length(H, W) - 1 + 2
    with pytest.raises(SequenceError, match=rf"span 1 \(boi at position {b1}\): no eoi before the next boi at position {b2}"):
        lay.find_spans(seq, grid=grid)
    spans = lay.find_spans(seq, grid=grid, repair=True)
    assert len(spans) == 3 and (spans[1].grid == grids[1]).all() and "no eoi" in spans[1].changes[0]

    lay, seq, grids, b1 = three_images(name, lambda s, lay: s[1:])  # span 1 loses its boi
    stray = b1 + lay.span_length(H, W) - 2
    with pytest.raises(SequenceError, match=rf"span 1: eoi at position {stray} without a boi"):
        lay.find_spans(seq, grid=grid)
    spans = lay.find_spans(seq, grid=grid, repair=True)
    assert [(s.grid == g).all() for s, g in zip(spans, [grids[0], grids[2]], strict=True)] == [True, True]
    assert any(f"eoi without a boi at position {stray}" in c for c in spans[0].changes)
    assert any("outside any image span" in c for c in spans[0].changes)

    lay, seq, grids, b1 = three_images(name, lambda s, lay: s)
    cut = seq[: b1 + 10]  # ends inside span 1
    with pytest.raises(SequenceError, match=rf"span 1 \(boi at position {b1}\): truncated.*at position {cut.size}"):
        lay.find_spans(cut, grid=grid)
    spans = lay.find_spans(cut, grid=grid, repair=True)
    assert len(spans) == 2 and spans[1].grid.shape == (H, W) and spans[1].changes[0].startswith("truncated")
    assert (spans[1].grid[0] == grids[1][0]).all()  # what arrived is kept


def test_image_ids_outside_a_span_are_an_error() -> None:
    lay = layout("lumina")
    s = lay.to_sequence(grid_of(H, W))
    seq = np.concatenate([s, [5, OFFSET + 3, 6], s])
    with pytest.raises(
        SequenceError, match=rf"span 1: 1 layout id\(s\) outside any image span, the first {OFFSET + 3} at position {s.size + 1}"
    ):
        lay.find_spans(seq)
    spans = lay.find_spans(seq, repair=True)
    assert len(spans) == 2 and "outside any image span" in spans[0].changes[0]


def test_chameleon_without_a_grid_wants_a_square() -> None:
    lay = layout("chameleon")
    assert lay.find_spans(lay.to_sequence(grid_of(4, 4)))[0].grid.shape == (4, 4)
    with pytest.raises(SequenceError, match=r"15 image ids are not a square grid \(give the grid"):
        lay.find_spans(lay.to_sequence(grid_of(3, 5)))


def test_plain_runs_split_into_grids() -> None:
    lay = layout("plain")
    a, b = grid_of(2, 3, seed=1), grid_of(2, 3, seed=2)
    seq = np.concatenate([[1], lay.to_sequence(a), lay.to_sequence(b), [2]])
    spans = lay.find_spans(seq, grid=(2, 3))
    assert [(s.start, s.end) for s in spans] == [(1, 7), (7, 13)] and (spans[1].grid == b).all()
    with pytest.raises(SequenceError, match=r"span 1: a run of 11 image ids is not a whole number of 2x3 grids.*at position 7"):
        lay.find_spans(seq[:-2], grid=(2, 3))
    spans = lay.find_spans(seq[:-2], grid=(2, 3), repair=True)
    assert spans[1].grid.ravel().tolist() == [*b.ravel()[:5].tolist(), b.ravel()[4]] and spans[1].changes


def test_emu3_size_text_that_names_no_grid() -> None:
    lay = layout("emu3")
    s = lay.to_sequence(grid_of(H, W))
    bad = np.concatenate([s[:1], text_ids("3x5"), s[4:]])
    with pytest.raises(SequenceError, match=r"size text \[51, 120, 53\] is not the text of 'h\*w'"):
        lay.find_spans(bad)
    assert lay.find_spans(bad, repair=True)[0].grid.shape == (H, W)


# --- constrained generation ---


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("hw", GRIDS)
def test_allowed_ids_walk_reproduces_the_structure(name: str, hw: tuple[int, int]) -> None:
    lay = layout(name)
    reference = lay.to_sequence(grid_of(*hw))
    rng = np.random.default_rng(3)
    walked = []
    for position in range(reference.size):
        allowed = allowed_ids(lay, hw, position)
        assert reference[position] in allowed
        if len(allowed) == 1:
            assert allowed[0] == reference[position]  # a structural id: exactly the one to_sequence puts there
        else:
            assert allowed == range(OFFSET, OFFSET + K)
        walked.append(int(rng.choice(allowed)))
    assert sum(len(allowed_ids(lay, hw, p)) > 1 for p in range(reference.size)) == hw[0] * hw[1]
    (span,) = lay.find_spans(np.array(walked), grid=parse_grid(name, hw))
    assert span.grid.shape == hw and span.changes == ()
    with pytest.raises(IndexError):
        allowed_ids(lay, hw, reference.size)


@pytest.mark.parametrize("name", ["chameleon", "lumina", "emu3"])
def test_logits_processor_forces_well_formed_spans_in_a_batch(name: str) -> None:
    """Greedy decoding from random logits, four prompts in different states: one ends with boi, one
    emits boi at step 4, one stops in the middle of a span, one holds a finished image (untouched).
    Every started span comes out well formed; without the processor it does not."""
    import torch
    from transformers import LogitsProcessorList

    from models.generation import ImageSpanLogitsProcessor

    lay = layout(name)
    hw = (3, 5)
    vocab = lay.vocab_size_needed + 20
    span = lay.to_sequence(grid_of(*hw))
    seen = lay.to_sequence(grid_of(2, 2))
    pad = 0
    prompts = [
        [11, 12, 13, span[0]],  # ends with boi
        [14, 15],  # text; boi comes at step 4
        [16, *span[:9].tolist()],  # stopped in the middle of a span
        [17, *seen.tolist(), 18],  # an image in the prompt, finished
    ]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])  # left-padded, as generate pads

    def run(processors: LogitsProcessorList) -> tuple[torch.Tensor, list[bool]]:
        generator = torch.Generator().manual_seed(0)
        out, untouched = ids.clone(), []
        for step in range(span.size + 8):
            raw = torch.randn(len(prompts), vocab, generator=generator)
            raw[:, lay.vocab_offset : lay.vocab_size_needed] -= 20.0  # a model that writes text between images
            if step == 4:
                raw[1, lay.special_id("boi")] = 50.0
            scores = processors(out, raw.clone())
            untouched.append(bool(torch.equal(scores[3], raw[3])))
            out = torch.cat([out, scores.argmax(dim=1, keepdim=True)], dim=1)
        return out, untouched

    out, untouched = run(LogitsProcessorList([ImageSpanLogitsProcessor(lay, hw)]))
    assert all(untouched)
    for row in range(3):
        spans = lay.find_spans(out[row].numpy(), grid=hw if name == "chameleon" else None)
        assert [s.grid.shape for s in spans] == [hw], row
        assert all(s.changes == () for s in spans)
    (generated,) = lay.find_spans(out[1].numpy(), grid=hw if name == "chameleon" else None)
    assert generated.start == width + 4
    loose, _ = run(LogitsProcessorList([]))
    with pytest.raises(SequenceError):
        lay.find_spans(loose[0].numpy(), grid=hw if name == "chameleon" else None)
    per_prompt = ImageSpanLogitsProcessor(lay, [hw, (2, 2), hw, hw])
    scores = per_prompt(ids, torch.zeros(4, vocab))
    assert torch.isfinite(scores[0]).nonzero().squeeze(1).tolist() == list(allowed_ids(lay, hw, 1))  # the id after boi
    assert torch.isfinite(scores[2]).nonzero().squeeze(1).tolist() == list(allowed_ids(lay, hw, 9))
    assert torch.isfinite(scores[1]).all() and torch.isfinite(scores[3]).all()


def test_logits_processor_in_generate_with_a_tiny_random_llm() -> None:
    """The processor inside transformers' own `generate` (a 1-layer Llama with random weights, built
    here: no download), a left-padded batch of two prompts of different lengths ending with boi."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.generation import ImageSpanLogitsProcessor

    lay = layout("lumina")
    hw = (3, 4)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=lay.vocab_size_needed, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, pad_token_id=0
    )
    model = LlamaForCausalLM(config).eval()
    boi = lay.special_id("boi")
    ids = torch.tensor([[0, 0, 21, 22, boi], [23, 24, 25, 26, boi]])
    mask = (ids != 0).long()
    length = lay.span_length(*hw)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=length - 1,
        do_sample=False,
        logits_processor=[ImageSpanLogitsProcessor(lay, hw)],
    )
    for row in out:
        (span,) = lay.find_spans(row.numpy())
        assert span.grid.shape == hw and span.changes == () and span.end == row.numel()


def test_a_layout_remembers_a_bounded_number_of_grid_shapes() -> None:
    """Clients choose grid shapes (resize=pad/none): the per-shape cache keeps the most recent SHAPES_KEPT,
    and a shape that was evicted is built again, the same."""
    from models.core.layouts import SHAPES_KEPT

    layout = Layout("lumina", vocab_offset=100, codebook_size=16, max_grid=64)
    first = layout.span_template(3, 5).copy()
    for h in range(1, 41):
        for w in range(1, 11):
            layout.code_positions(h, w)
    assert sum(isinstance(k, tuple) for k in layout._cache) <= SHAPES_KEPT
    assert ("template", 3, 5) not in layout._cache  # long unused: gone
    assert np.array_equal(layout.span_template(3, 5), first)
    grid = np.arange(15).reshape(3, 5) % 16
    (span,) = layout.find_spans(layout.to_sequence(grid))
    assert np.array_equal(span.grid, grid)
