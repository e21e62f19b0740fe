"""Dense reference math for the training pass: plain autograd over B×F matrices.

`sparse.py` computes the same values and gradients without the dense B×F gradient; the tests
hold the two together. Both take the selected entries as (rows, cols), sorted row-major.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_codes(rows: Tensor, cols: Tensor, values: Tensor, n_rows: int, width: int) -> Tensor:
    """z [B, F]: values at (rows, cols), zero elsewhere."""
    z = torch.zeros(n_rows, width, dtype=values.dtype, device=values.device)
    return z.index_put((rows, cols), values)


def decode(rows: Tensor, cols: Tensor, values: Tensor, aux_rows: Tensor, aux_cols: Tensor, aux_values: Tensor,
           W_dec: Tensor, bounds: list[int], n_rows: int) -> tuple[Tensor, Tensor]:
    """Segment contributions [B, G, d_out] of the codes and aux-k output [B, d_out] (no bias)."""
    width = W_dec.shape[0]
    z_aux = dense_codes(aux_rows, aux_cols, aux_values, n_rows, width)
    return dense_segments(dense_codes(rows, cols, values, n_rows, width), W_dec, bounds), z_aux @ W_dec


def dense_segments(z: Tensor, W_dec: Tensor, bounds: list[int]) -> Tensor:
    """[B, G, d_out] segment contributions of dense codes z [B, F]."""
    starts = [0, *bounds[:-1]]
    return torch.stack([z[:, s:e] @ W_dec[s:e] for s, e in zip(starts, bounds)], dim=1)
