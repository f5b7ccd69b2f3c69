"""The one output type every quantizer returns, in training and in eval alike."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .functional import perplexity_from_counts, usage_from_counts


@dataclass
class QuantizerOutput:
    quantized: Tensor  # (B, D, H, W): forward value is the code; gradient per the estimator
    indices: Tensor  # (B, H, W) int64 in [0, codebook_size)
    loss: Tensor  # scalar: codebook_loss + beta * commitment_loss (zero for FSQ)
    codebook_loss: Tensor  # scalar ‖sg(e) − q‖²
    commitment_loss: Tensor  # scalar ‖e − sg(q)‖²
    counts: Tensor  # (K,) int64 histogram of this batch's indices; sum over batches for a whole set

    @property
    def codebook_size(self) -> int:
        return int(self.counts.numel())

    @property
    def batch_usage(self) -> float:
        """Per-batch codebook usage: codes used at least once in this batch ÷ K."""
        return usage_from_counts(self.counts)

    @property
    def batch_perplexity(self) -> float:
        """exp(entropy) of this batch's code frequencies."""
        return perplexity_from_counts(self.counts)
