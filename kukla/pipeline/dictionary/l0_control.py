"""A target-L0 controller for the penalised dictionaries (ReLU, JumpReLU): λ follows the L0 you ask for.

With an L1, log or L0 penalty the L0 is whatever λ gives, and that drifts as training goes; a sweep
that must compare dictionaries at equal L0 wants λ set by the L0 instead. After every step

    λ ← λ · exp(rate · (L0 − target) / max(L0, target))

raises λ while the batch fires too many latents and lowers it while it fires too few: a
multiplicative (log-space) integral controller, so λ stays positive, and its error term is
bounded in (−1, 1) both ways, so a far-off start cannot overshoot into an all-dead dictionary.
λ lives in a buffer, so checkpoints carry it and a resumed run continues exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def adjust_penalty(dictionary: nn.Module, l0: Tensor | float, target: float, rate: float) -> None:
    """One controller step from this batch's L0 (under DDP: the mean over ranks)."""
    coefficient = dictionary.penalty_coefficient
    l0 = torch.as_tensor(l0, dtype=coefficient.dtype, device=coefficient.device)
    coefficient.mul_(torch.exp(rate * (l0 - target) / l0.clamp_min(target)))
