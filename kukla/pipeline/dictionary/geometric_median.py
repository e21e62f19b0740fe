"""Geometric median (Weiszfeld's iteration): the decoder bias an SAE starts from.

The point minimising Σᵢ‖xᵢ − m‖ is robust to the few huge-norm tokens (BOS, attention sinks)
that drag the mean away from where most activations live.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """argmin_m Σᵢ‖pointsᵢ − m‖ for points [N, d], by Weiszfeld's reweighted means (float64)."""
    pts = points.double()
    median = pts.mean(dim=0)
    for _ in range(max_iter):
        dist = (pts - median).norm(dim=1).clamp_min(1e-12)  # a point at the median gets a huge, finite weight
        weights = 1.0 / dist
        new = (weights[:, None] * pts).sum(dim=0) / weights.sum()
        step = (new - median).norm()
        median = new
        if step <= tol * (1.0 + median.norm()):
            break
    return median.to(points.dtype)
