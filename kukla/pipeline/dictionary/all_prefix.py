"""The reconstruction error of every prefix at once (all-prefix Matryoshka, block size 1).

For a row with active latents i₁ < … < i_m, the prefix of length p reconstructs with the
latents below p, so its residual is r_j = e − Σ_{l ≤ j} c_l (c_l = zₗ W_dec,iₗ) for every p in
(i_j, i_{j+1}]: only m + 1 distinct residuals. Hence

    Σ_{p=1..F} w_p ‖e − ê_p‖² = Σ_{j=0..m} (C(i_{j+1}) − C(i_j)) · ‖r_j‖²,   i₀ = 0, i_{m+1} = F,

with C the cumulative prefix weight. The ‖r_j‖² need no residual vectors: with a_l = c_l·e and
the row's m×m Gram matrix G of its contributions, ‖r_j‖² = ‖e‖² − 2 Σ_{l≤j} a_l + Σ_{l,l'≤j} G_ll',
two cumulative sums over m×m numbers. Rows are sorted by m and padded within a few groups, so
BatchTopK's uneven rows cost ≈ Σ_b m_b·d memory and Σ_b m_b²·d flops, never B·F·d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kukla.pipeline.dictionary.snap import row_errors


GROUPS = 8
"""Row groups of similar active counts, each padded to its own largest count."""


def _groups(counts: Tensor) -> list[tuple[Tensor, int]]:
    """(row indices, their largest active count) for GROUPS runs of rows sorted by count, so
    padding is small even when BatchTopK gives rows very different counts (one device read)."""
    sorted_counts, order = torch.sort(counts, stable=True)
    groups = [g for g in torch.tensor_split(torch.arange(len(order), device=order.device),
                                             min(GROUPS, max(len(order), 1))) if g.numel()]
    maxima = sorted_counts[torch.stack([g[-1] for g in groups])].tolist()
    return [(order[g], m) for g, m in zip(groups, maxima)]


def all_prefix_errors(rows: Tensor, cols: Tensor, values: Tensor, W_dec: Tensor, to_explain: Tensor,
                      cdf: Tensor, l2: bool = False) -> Tensor:
    """Σ_b Σ_p w_p ‖e_b − ê_b,p‖² (or ‖·‖ when l2), for the active codes (rows, cols, values) sorted
    row-major with ascending columns; to_explain e = y − b_dec; cdf [F+1] C(l), C(0) = 0, C(F) = 1."""
    n_rows, width = to_explain.shape[0], W_dec.shape[0]
    counts = torch.bincount(rows, minlength=n_rows)
    starts = counts.cumsum(0) - counts
    cdf = cdf.to(device=to_explain.device, dtype=to_explain.dtype)
    values = values.to(to_explain.dtype)
    groups = _groups(counts)
    layout = []  # per group: its rows' entry index at each slot, and which slots hold an entry
    for group, m in groups:
        slot = torch.arange(m, device=cols.device)
        valid = slot[None, :] < counts[group][:, None]  # [n, m]
        layout.append((torch.where(valid, starts[group][:, None] + slot[None, :], 0), valid))
    # one gather of every group's decoder rows (one dense backward into W_dec, not one per group)
    flat = torch.cat([cols[entry].reshape(-1) for entry, _ in layout]) if groups else cols[:0]
    decoder_rows = F.embedding(flat, W_dec).to(to_explain.dtype).split([e.numel() for e, _ in layout])
    total = to_explain.new_zeros(())
    for (group, m), (entry, valid), rows_flat in zip(groups, layout, decoder_rows):
        e = to_explain[group]
        sq = [e.pow(2).sum(dim=1, keepdim=True)]  # ‖r_0‖² = ‖e‖²
        ends = torch.full((group.numel(), m + 2), width, dtype=torch.long, device=cols.device)
        ends[:, 0] = 0
        if m:
            z = values[entry] * valid  # [n, m]; padding has z = 0, so its decoder row never counts
            rows_dec = rows_flat.view(group.numel(), m, -1)  # [n, m, d]
            a = z * torch.bmm(rows_dec, e[:, :, None]).squeeze(2)  # c_l·e
            gram = z[:, :, None] * z[:, None, :] * torch.bmm(rows_dec, rows_dec.transpose(1, 2))
            inner = gram.cumsum(1).cumsum(2).diagonal(dim1=1, dim2=2)  # ‖Σ_{l≤j} c_l‖²
            sq.append((sq[0] - 2 * a.cumsum(1) + inner).clamp_min(0))
            ends[:, 1:-1] = torch.where(valid, cols[entry], width)
        cumulative = cdf[ends]
        span_weight = cumulative[:, 1:] - cumulative[:, :-1]  # [n, m+1]; 0 on padding
        total = total + (span_weight * row_errors(torch.cat(sq, dim=1), l2)).sum()
    return total
