"""Warm start of a deeper network from a shallower one ("grow"): the shipped f8 tokenizer's weights give
an f16 network its image-side levels.

The encoder and decoder are built level by level (models/networks.py): an encoder with one level more has
the same blocks, at the same indices, from the image down to the old coarsest level, and a decoder with one
level more has the old decoder's blocks as the tail of its own (it starts at the coarsest level). So each
source tensor is copied to the target tensor of the same role — the encoder aligned at its input, the
decoder's up blocks at its output — where the shapes agree. What has no counterpart (the new level, widths
that changed, a quantizer of another kind) keeps its fresh initialisation. The high-resolution layers, which
cost most of a training step and learn slowest, start trained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor, nn

from models.config import TokenizerConfig

_UP = re.compile(r"^decoder\.up\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class GrowReport:
    copied: int  # tensors copied from the source
    fresh: int  # target tensors left as initialised
    skipped: int  # source tensors with no counterpart of the same shape

    def __str__(self) -> str:
        return f"{self.copied} tensors copied, {self.fresh} fresh, {self.skipped} of the source unused"


def check_growable(source: TokenizerConfig, target: TokenizerConfig) -> None:
    """ValueError unless `grow_into` can map `source` onto `target`: it aligns blocks by their index in
    vqtok's own level layout, so both must be that network with the same blocks per level (else tensors
    would land in blocks of other roles wherever shapes happen to agree)."""
    if (source.architecture, target.architecture) != ("vqtok", "vqtok"):
        raise ValueError(f"grows vqtok's own network only; the source is {source.architecture!r}, the target {target.architecture!r}")
    if source.num_res_blocks != target.num_res_blocks:
        raise ValueError(
            f"num_res_blocks {source.num_res_blocks} in the source, {target.num_res_blocks} in the target: growing needs the same blocks per level"
        )


def _up_blocks(model: nn.Module) -> int:
    return len(model.decoder.up)  # type: ignore[union-attr, arg-type]


def grow_into(target: nn.Module, source: nn.Module) -> GrowReport:
    """Copy every source tensor into `target` where its counterpart exists with the same shape (in place)."""
    shift = _up_blocks(target) - _up_blocks(source)
    if shift < 0:
        raise ValueError("grow_into: the target's decoder has fewer blocks than the source's (a shallower network)")
    target_state = target.state_dict()
    source_state = source.state_dict()
    update: dict[str, Tensor] = {}
    skipped = 0
    for name, tensor in source_state.items():
        match = _UP.match(name)
        to = f"decoder.up.{int(match.group(1)) + shift}.{match.group(2)}" if match else name
        if to in target_state and target_state[to].shape == tensor.shape:
            update[to] = tensor
        else:
            skipped += 1
    target.load_state_dict(update, strict=False)
    return GrowReport(copied=len(update), fresh=len(target_state) - len(update), skipped=skipped)
