"""The reconstruction error of every prefix at once (all-prefix Matryoshka, block size 1).

For a row with active latents i₁ < … < i_m, the prefix of length p reconstructs with the
latents below p, so its residual is r_j = e − Σ_{l ≤ j} zₗ W_dec,iₗ for every p in (i_j, i_{j+1}]:
only m + 1 distinct residuals. Hence

    Σ_{p=1..F} w_p ‖e − ê_p‖² = Σ_{j=0..m} (C(i_{j+1}) − C(i_j)) · ‖r_j‖²,   i₀ = 0, i_{m+1} = F,

with C the cumulative prefix weight. The residuals are one cumulative sum over each row's active
contributions, padded to the batch's largest m: memory B·m_max·d, never B·F·d.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kukla.pipeline.dictionary.snap import row_errors


def row_slots(rows: Tensor, n_rows: int) -> tuple[Tensor, int]:
    """Position of each entry within its row (entries sorted row-major) and the largest row count."""
    counts = torch.bincount(rows, minlength=n_rows)
    starts = counts.cumsum(0) - counts
    return torch.arange(rows.numel(), device=rows.device) - starts[rows], int(counts.max()) if n_rows else 0


def all_prefix_errors(rows: Tensor, cols: Tensor, values: Tensor, W_dec: Tensor, to_explain: Tensor,
                      cdf: Tensor, l2: bool = False) -> tuple[Tensor, Tensor]:
    """(Σ_b Σ_p w_p ‖e_b − ê_b,p‖² — or ‖·‖ when l2 — and the full-width residual [B, d]).

    rows/cols/values: the active codes, row-major with ascending columns; to_explain e = y − b_dec;
    cdf: [F+1] C(l) with C(0) = 0 and C(F) = 1.
    """
    n_rows, width = to_explain.shape[0], W_dec.shape[0]
    slot, m = row_slots(rows, n_rows)
    contributions = torch.zeros(n_rows, m, W_dec.shape[1], dtype=to_explain.dtype, device=to_explain.device)
    contributions = contributions.index_put((rows, slot), values[:, None].to(to_explain.dtype) * W_dec[cols])
    reconstructed = torch.cat([torch.zeros_like(to_explain)[:, None], contributions.cumsum(1)], dim=1)
    residuals = to_explain[:, None, :] - reconstructed  # [B, m+1, d]: r_0 … r_m (padding repeats r_m)
    ends = torch.full((n_rows, m + 2), width, dtype=torch.long, device=cols.device)
    ends[:, 0] = 0
    ends[rows, slot + 1] = cols
    cumulative = cdf.to(device=to_explain.device, dtype=to_explain.dtype)[ends]
    span_weight = cumulative[:, 1:] - cumulative[:, :-1]  # [B, m+1]; 0 on padding
    return (span_weight * row_errors(residuals.pow(2).sum(dim=2), l2)).sum(), residuals[:, -1]
