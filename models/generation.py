"""Constrained image generation for LLMs with a vqtok layout: a transformers `LogitsProcessor`.

Once a boi has been emitted (by the model or at the end of the prompt), the logits are masked to the
ids `models.core.layouts.allowed_ids` allows at each position of the span, until the span is complete:
image ids where codes go, and the one structural id (eol, a size token, eof, eoi, the "h*w" text)
where the layout puts one. The model can then only emit well-formed images of the chosen grid.
This is what Lumina-mGPT (`MultiModalLogitsProcessor` in Alpha-VLLM/Lumina-mGPT
`lumina_mgpt/inference_solver.py`) and Emu3 (`Emu3PrefixConstrainedLogitsHelper` in baaivision/Emu3
`emu3/mllm/utils_emu3.py`) do by hand for their own layouts, for every layout, on a whole batch at once.

This module is the only one in vqtok that imports transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import cast

import torch
from torch import Tensor

from .core.layouts import ANY_CODE, Layout, LayoutError

try:
    from transformers import LogitsProcessor
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("models.generation needs transformers: pip install transformers") from exc


class ImageSpanLogitsProcessor(LogitsProcessor):
    """Masks the logits of every batch row that is inside an image span to the ids its structure allows.

    `grid`: the (h, w) of the images to generate, one for the whole batch or one per prompt (rows are
    matched to prompts as `generate` expands them for beams or `num_return_sequences`: consecutively).
    A row is inside a span when its last boi comes after its last eoi and fewer ids than the span's
    length follow it; rows elsewhere (text, a finished image, an image in the prompt) are untouched.
    Each row is judged from its own ids, so prompts of different lengths and states share a batch.
    """

    def __init__(self, layout: Layout, grid: tuple[int, int] | Sequence[tuple[int, int]]) -> None:
        if layout.name == "plain":
            raise LayoutError("the plain layout has no boi to start a span on: constrain generation with chameleon, lumina or emu3")
        grids = _grids(grid)
        templates = [layout.span_template(h, w) for h, w in grids]
        longest = max(t.size for t in templates)
        table = torch.full((len(templates), longest), ANY_CODE, dtype=torch.long)
        for i, t in enumerate(templates):
            table[i, : t.size] = torch.tensor(t)
        self.layout = layout
        self.templates = table  # (G, L): the span of each grid, ANY_CODE where an image id goes
        self.lengths = torch.tensor([t.size for t in templates])  # (G,)
        self.boi, self.eoi = layout.special_id("boi"), layout.special_id("eoi")

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """input_ids (B, T), scores (B, V) -> scores with the disallowed ids of in-span rows at -inf."""
        b, t = input_ids.shape
        if scores.shape[-1] < self.layout.vocab_size_needed:
            raise ValueError(f"the logits have {scores.shape[-1]} ids; the {self.layout.name} layout needs {self.layout.vocab_size_needed}")
        g = self.templates.shape[0]
        if b % g:
            raise ValueError(f"{g} grids for a batch of {b} rows: give one grid, or one per prompt")
        device = input_ids.device
        row_grid = torch.arange(g, device=device).repeat_interleave(b // g)  # (B,)
        where = torch.arange(t, device=device)
        last_boi = torch.where(input_ids == self.boi, where, -1).amax(dim=1)
        last_eoi = torch.where(input_ids == self.eoi, where, -1).amax(dim=1)
        position = t - last_boi  # index in the span of the id about to be chosen
        lengths = self.lengths.to(device)[row_grid]
        active = (last_boi >= 0) & (last_boi > last_eoi) & (position < lengths)
        if not bool(active.any()):
            return scores
        templates = self.templates.to(device)
        fixed = templates[row_grid, position.clamp(max=templates.shape[1] - 1)]  # (B,)
        codes = self.layout.code_range
        allowed = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        allowed[:, codes.start : codes.stop] = (fixed == ANY_CODE).unsqueeze(1)
        rows = torch.nonzero(fixed != ANY_CODE).squeeze(1)
        allowed[rows, fixed[rows]] = True
        return scores.masked_fill(active.unsqueeze(1) & ~allowed, float("-inf"))


def _grids(grid: tuple[int, int] | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """One (h, w), or one per prompt, as a list."""
    if len(grid) == 2 and all(isinstance(side, Integral) for side in grid):
        h, w = cast(tuple[int, int], grid)
        return [(int(h), int(w))]
    return [(int(h), int(w)) for h, w in cast(Sequence[tuple[int, int]], grid)]
