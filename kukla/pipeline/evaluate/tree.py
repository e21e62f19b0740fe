"""The Matryoshka tree: which later-level latents fire mostly when an earlier one fires.

A Matryoshka dictionary's early levels hold general features and later levels their
specialisations. A later latent j is a child of the earlier latent i that fires on the
largest fraction of j's firings, P(i fires | j fires), when that fraction is at least
`min_fraction`. Co-firing is counted on eval rows with one [P, F] matmul of fire masks per
batch; parents are the first `max_parents` latents of the levels before the last, so memory
is P·F counts whatever the number of tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_PARENTS = 1024
MIN_FRACTION = 0.5


class CoFiring:
    """Counts of tokens on which parent candidate i and latent j both fire ([P, F]) and of j's firings."""

    def __init__(self, levels: list[int], max_parents: int = MAX_PARENTS) -> None:
        self.levels = levels
        self.parents = min(levels[-2], max_parents) if len(levels) > 1 else 0
        self.both: Tensor | None = None
        self.fired: Tensor | None = None

    def update(self, z: Tensor) -> None:
        """Add a batch of codes [B, F]."""
        if self.parents == 0:
            return
        fired = (z > 0).float()
        both = (fired[:, :self.parents].T @ fired).round().int()
        count = fired.sum(0).round().int()
        if self.both is None or self.fired is None:
            self.both, self.fired = both, count
        else:
            self.both += both
            self.fired += count

    def tree(self, min_fraction: float = MIN_FRACTION) -> tuple[Tensor, Tensor]:
        """Per latent: its parent (−1 for none) and P(parent fires | it fires) (NaN for none), [F] each.

        A latent's parent comes from a strictly earlier level; latents of the first level have none."""
        width = self.levels[-1]
        parent = torch.full((width,), -1, dtype=torch.long)
        fraction = torch.full((width,), float("nan"))
        if self.both is None or self.fired is None:
            return parent, fraction
        share = self.both.double().cpu() / self.fired.double().cpu().clamp(min=1)  # [P, F]
        level_start = torch.tensor([0, *self.levels[:-1]])
        start_of = level_start[torch.searchsorted(torch.tensor(self.levels), torch.arange(width), right=True)]
        allowed = torch.arange(self.parents)[:, None] < start_of[None, :]
        share = torch.where(allowed, share, torch.full_like(share, -1.0))
        best, index = share.max(dim=0)
        keep = (best >= min_fraction) & (self.fired.cpu() > 0)
        parent[keep] = index[keep]
        fraction[keep] = best[keep].float()
        return parent, fraction
