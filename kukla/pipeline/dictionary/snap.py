"""Snap loss (Chanin et al.): late in training, reconstruct with the L2 norm ‖y − ŷ‖, not its square.

The squared error lets a latent trade a little error on many rows for a lot on a few; the
unsquared norm weighs every row's error linearly, which snaps latents onto cleaner features.
Both are normalised by the same quantity at zero codes (Σ‖y − ȳ‖² or Σ‖y − ȳ‖), so the
weights of the other terms keep their meaning.
"""

from __future__ import annotations

import math

from torch import Tensor


def row_errors(squared_norms: Tensor, l2: bool) -> Tensor:
    """Each row's reconstruction error from its ‖r‖²: itself, or ‖r‖ under the snap loss."""
    return squared_norms.clamp_min(1e-30).sqrt() if l2 else squared_norms


def deviation_total(target: Tensor, l2: bool) -> Tensor:
    """What the error is normalised by: Σ_b ‖y_b − ȳ‖² (FVU), or Σ_b ‖y_b − ȳ‖ under the snap loss."""
    return row_errors((target - target.mean(dim=0)).float().pow(2).sum(dim=1), l2).sum().clamp_min(1e-12)


def snap_step(fraction: float | None, total_steps: int) -> int | None:
    """The first step trained with the L2 loss, or None when the snap loss is off."""
    return None if fraction is None else math.ceil(fraction * total_steps)
