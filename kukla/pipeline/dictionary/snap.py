"""Snap loss (Chanin et al.): late in training, reconstruct with the L2 norm ‖y − ŷ‖, not its square.

The squared error lets a latent trade a little error on many rows for a lot on a few; the
unsquared norm weighs every row's error linearly, which snaps latents onto cleaner features.
Both are normalised by the same quantity at zero codes (Σ‖y − ȳ‖² or Σ‖y − ȳ‖), so the
weights of the other terms keep their meaning.
"""

from __future__ import annotations

import math

from torch import Tensor

from kukla.pipeline.dictionary.global_batch import GlobalBatch


def row_errors(squared_norms: Tensor, l2: bool) -> Tensor:
    """Each row's reconstruction error from its ‖r‖²: itself, or ‖r‖ under the snap loss."""
    return squared_norms.clamp_min(1e-30).sqrt() if l2 else squared_norms


def snap_step(fraction: float | None, total_steps: int) -> int | None:
    """The first step trained with the L2 loss, or None when the snap loss is off."""
    return None if fraction is None else math.ceil(fraction * total_steps)


def deviation_norms_per_row(batch: GlobalBatch, t: Tensor) -> Tensor:
    """Σ_b ‖t_b − t̄‖ / N over the global batch: the snap loss's denominator per row (as
    `GlobalBatch.variance_per_row` is the FVU's)."""
    deviation, n = batch.deviations(t)
    return batch.sum(deviation.pow(2).sum(dim=1).sqrt().sum()) / n


def prefix_norms(target: Tensor, segments: Tensor) -> Tensor:
    """[G] Σ_b ‖t_b − Σ_{i≤j} s_bi‖ of the prefix reconstructions (segments [B, G, d])."""
    return row_errors((target[:, None, :] - segments.cumsum(dim=1)).pow(2).sum(dim=2), True).sum(dim=0)
