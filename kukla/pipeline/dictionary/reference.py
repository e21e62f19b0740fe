"""Dense reference math for the training pass: plain autograd over B×F matrices.

`sparse.py` computes the same values and gradients without the dense B×F gradient; the tests
hold the two together. Both take the selected entries as (rows, cols), sorted row-major.
"""

from __future__ import annotations

import torch
from torch import Tensor


def decode_segments(rows: Tensor, cols: Tensor, values: Tensor, W_dec: Tensor,
                    bounds: list[int] | Tensor, n_rows: int) -> Tensor:
    """[B, G, d_out] segment contributions of the codes given as (rows, cols, values)."""
    z = torch.zeros(n_rows, W_dec.shape[0], dtype=values.dtype, device=values.device)
    return dense_segments(z.index_put((rows, cols), values), W_dec, bounds)


def dense_segments(z: Tensor, W_dec: Tensor, bounds: list[int] | Tensor) -> Tensor:
    """[B, G, d_out] segment contributions of dense codes z [B, F]. Slicing needs the bounds on
    the host: drawn ones are read back, the dense path's one device read (the sparse path has none)."""
    if isinstance(bounds, Tensor):
        bounds = bounds.tolist()
    starts = [0, *bounds[:-1]]
    return torch.stack([z[:, s:e] @ W_dec[s:e] for s, e in zip(starts, bounds)], dim=1)


def prefix_errors(target: Tensor, segments: Tensor) -> tuple[Tensor, Tensor]:
    """[G] squared errors Σ_b ‖t_b − Σ_{i≤j} s_bi‖² of the prefix reconstructions, by a cumulative
    sum, and the full reconstruction's residual (detached)."""
    residuals = target[:, None, :] - segments.cumsum(dim=1)
    return residuals.pow(2).sum(dim=(0, 2)), residuals[:, -1].detach()
