"""The layouts of the encode and decode routes (issue 27): which layout a request names, built once per
(preset, offset, K, max_grid) and kept, the service's grid-side limit, and the answer's description.

The service's `max_grid` for a model with downsample f is `grid_side_limit(max_grid_tokens,
max_image_pixels, f)` = min(max_grid_tokens, max_image_pixels // f²): the longest side any grid it
encodes or decodes can have. A request may name a smaller one (an LLM's vocabulary extended for a
smaller grid); lumina's size-token ids do not depend on it.
"""

from __future__ import annotations

from functools import lru_cache

from models.core.layouts import EMU3_NEEDS_TEXT, Layout, LayoutError, grid_side_limit

from ..deps import ServiceState
from ..problems import Unprocessable
from ..repository import Served
from ..schemas import MAX_ID


def max_grid(state: ServiceState, served: Served) -> int:
    s = state.settings
    return grid_side_limit(s.max_grid_tokens, s.max_image_pixels, served.runtime.info.downsample)


@lru_cache(maxsize=64)
def _build(name: str, vocab_offset: int, codebook_size: int, side: int) -> Layout:
    return Layout(name, vocab_offset=vocab_offset, codebook_size=codebook_size, max_grid=side)


def layout_for(state: ServiceState, served: Served, name: str, vocab_offset: int | None, asked_max_grid: int | None) -> Layout:
    """The Layout a request names, or a 422 that says why it cannot be built."""
    if name == "emu3":
        raise Unprocessable(EMU3_NEEDS_TEXT)
    limit = max_grid(state, served)
    side = limit if asked_max_grid is None else asked_max_grid
    if side > limit:
        raise Unprocessable(
            f"max_grid {side} is over this server's largest grid side, {limit} (min(max_grid_tokens, max_image_pixels / f²))"
        )
    try:
        layout = _build(name, int(vocab_offset or 0), served.runtime.info.codebook_size, side)
    except LayoutError as exc:
        raise Unprocessable(str(exc)) from None
    if layout.vocab_size_needed - 1 > MAX_ID:
        raise Unprocessable(
            f"vocab_offset {layout.vocab_offset}: the layout's largest id, {layout.vocab_size_needed - 1}, is over {MAX_ID} (int32)"
        )
    return layout


def form_int(value: str | None, field: str) -> int | None:
    """An integer multipart field or query parameter (None when absent), or a 422."""
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise Unprocessable(f"{field} must be an integer, not {value!r}") from None
