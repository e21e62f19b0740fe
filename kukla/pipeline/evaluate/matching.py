"""Cross-dictionary matching: for each latent of A, its best activation correlation with a latent of B.

Summarised as the mean over A's live latents (mean max correlation): near 1 when B holds
every feature of A, lower where B splits (fragments) or lacks them. Correlations are
Pearson over the same eval rows for both dictionaries, computed in chunks of A's latents
so the [Fa, Fb] matrix never exists.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _standardised(z: Tensor) -> Tensor:
    """Columns centred and scaled to unit norm (zero columns stay zero): float32 values with sums
    accumulated in float64, so a [4096, 65k] code matrix costs 1 GB, not 2."""
    centred = z.float() - (z.float().sum(0, dtype=torch.float64) / max(z.shape[0], 1)).float()
    norm = centred.pow(2).sum(0, dtype=torch.float64).sqrt().clamp(min=1e-30)
    return centred / norm.float()


@torch.no_grad()
def max_correlation(z_a: Tensor, z_b: Tensor, chunk_elements: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """For each latent of A (codes z_a [N, Fa]), its largest Pearson correlation with any latent of B
    (z_b [N, Fb]) and that latent; NaN / −1 for latents of A that never vary (dead ones)."""
    a, b = _standardised(z_a), _standardised(z_b)
    live_a, live_b = z_a.float().std(0) > 0, z_b.float().std(0) > 0
    rows = max(1, chunk_elements // max(b.shape[1], 1))
    best = torch.full((a.shape[1],), float("nan"))
    index = torch.full((a.shape[1],), -1, dtype=torch.long)
    if not bool(live_b.any()):
        return best, index
    for start in range(0, a.shape[1], rows):
        corr = a[:, start:start + rows].T @ b
        corr[:, ~live_b] = float("-inf")
        value, idx = corr.max(dim=1)
        best[start:start + rows], index[start:start + rows] = value.cpu(), idx.cpu()
    best[~live_a.cpu()] = float("nan")
    index[~live_a.cpu()] = -1
    return best, index


def mean_max_correlation(best: Tensor) -> float:
    """The summary over A's live latents (NaN when none is live)."""
    return float(best[~best.isnan()].mean()) if bool((~best.isnan()).any()) else float("nan")
