"""The reconstruction error of every prefix at once (all-prefix Matryoshka, block size 1).

For a row with active latents i₁ < … < i_m, the prefix of length p reconstructs with the
latents below p, so its residual is r_j = e − Σ_{l ≤ j} c_l (c_l = zₗ W_dec,iₗ) for every p in
(i_j, i_{j+1}]: only m + 1 distinct residuals. Hence

    Σ_{p=1..F} w_p ‖e − ê_p‖² = Σ_{j=0..m} (C(i_{j+1}) − C(i_j)) · ‖r_j‖²,   i₀ = 0, i_{m+1} = F,

with C the cumulative prefix weight. The ‖r_j‖² come from one [B, d] residual updated in place
by slot: step j subtracts every row's j-th contribution, r_j = r_{j−1} − c_j. With rows sorted
by active count (descending), the rows that have a j-th entry are a leading block, so BatchTopK's
uneven rows cost Σ_b m_b·d gathered decoder numbers and no padding, never B·F·d, and each step
works on one cache-sized [B, d] block rather than a [B, m, d] tensor (or a B·m²·d Gram).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kukla.pipeline.dictionary.snap import row_errors


class _SlotResiduals(torch.autograd.Function):
    """‖r_j‖² after each active entry (flat [nnz]) and ‖e‖² per row, residuals walked in place.

    Backward walks them back from the last (r_{j−1} = r_j + c_j), carrying A_j = Σ_{j' ≥ j}
    ∂L/∂r_{j'}: ∂L/∂z_j = −A_j·d_j, ∂L/∂d_j = −z_j A_j, ∂L/∂e = A_0. Decoder rows are gathered
    again rather than kept, so nothing of size nnz·d is stored.
    """

    @staticmethod
    def forward(ctx, e: Tensor, values: Tensor, W_dec: Tensor, cols: Tensor, order: Tensor,  # type: ignore[override]
                slot_entries: list[Tensor]) -> tuple[Tensor, Tensor]:
        first = torch.linalg.vecdot(e, e)
        r = e[order]  # rows sorted by active count, descending; a copy
        after = torch.empty_like(values, dtype=r.dtype)
        for entries in slot_entries:
            n = entries.numel()
            r[:n].addcmul_(W_dec.index_select(0, cols[entries]).to(r.dtype), values[entries, None].to(r.dtype),
                           value=-1.0)
            after[entries] = torch.linalg.vecdot(r[:n], r[:n])
        ctx.slot_entries = slot_entries
        ctx.save_for_backward(r, values, W_dec, cols, order)
        return first, after

    @staticmethod
    def backward(ctx, grad_first: Tensor, grad_after: Tensor):  # type: ignore[override]
        r, values, W_dec, cols, order = ctx.saved_tensors
        r = r.clone()
        acc = torch.zeros_like(r)
        grad_values = torch.empty_like(values, dtype=r.dtype)
        grad_W = torch.zeros_like(W_dec, dtype=r.dtype)
        for entries in reversed(ctx.slot_entries):
            n = entries.numel()
            acc[:n].addcmul_(r[:n], grad_after[entries, None], value=2.0)
            rows_dec = W_dec.index_select(0, cols[entries]).to(r.dtype)
            z = values[entries, None].to(r.dtype)
            grad_values[entries] = -torch.linalg.vecdot(acc[:n], rows_dec)
            grad_W.index_add_(0, cols[entries], acc[:n] * z, alpha=-1.0)
            r[:n].addcmul_(rows_dec, z)
        acc.addcmul_(r, grad_first[order, None], value=2.0)
        grad_e = torch.empty_like(acc).index_copy_(0, order, acc)
        return grad_e, grad_values.to(values.dtype), grad_W.to(W_dec.dtype), None, None, None


def _slots(rows: Tensor, n_rows: int, row_count: int | None) -> tuple[Tensor, list[Tensor]]:
    """Rows by active count (descending), and per slot j the flat indices of the j-th entry of
    each row that has one (a leading block of those rows). One device read of the count
    histogram, none when every row has row_count entries (TopK)."""
    counts = torch.bincount(rows, minlength=n_rows)
    starts = counts.cumsum(0) - counts
    if row_count is not None:
        order = torch.arange(n_rows, device=rows.device)
        sizes = [n_rows] * row_count
    else:
        order = torch.argsort(counts, descending=True, stable=True)
        histogram = torch.bincount(counts)
        sizes = histogram.flip(0).cumsum(0).flip(0)[1:].tolist()  # rows with > j entries
    starts = starts[order]
    return order, [starts[:n] + j for j, n in enumerate(sizes)]


def all_prefix_errors(rows: Tensor, cols: Tensor, values: Tensor, W_dec: Tensor, to_explain: Tensor,
                      cdf: Tensor, l2: bool = False, row_count: int | None = None) -> Tensor:
    """Σ_b Σ_p w_p ‖e_b − ê_b,p‖² (or ‖·‖ when l2), for the active codes (rows, cols, values) sorted
    row-major with ascending columns; to_explain e = y − b_dec; cdf [F+1] C(l), C(0) = 0, C(F) = 1;
    row_count: every row's number of entries, when the activation fixes it (TopK's k)."""
    n_rows, width = to_explain.shape[0], W_dec.shape[0]
    order, slot_entries = _slots(rows, n_rows, row_count)
    first, after = _SlotResiduals.apply(to_explain, values, W_dec, cols, order, slot_entries)
    cdf = cdf.to(device=to_explain.device, dtype=to_explain.dtype)
    # the span after each entry ends at the row's next active column, or at F after its last
    last = torch.ones_like(rows, dtype=torch.bool)
    last[:-1] = rows[1:] != rows[:-1]
    nxt = torch.where(last, width, cols.roll(-1))
    first_col = torch.full((n_rows,), width, dtype=cols.dtype, device=cols.device)
    first_col.scatter_reduce_(0, rows, cols, reduce="amin")
    return (cdf[first_col] * row_errors(first, l2)).sum() + ((cdf[nxt] - cdf[cols]) * row_errors(after, l2)).sum()
