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

import itertools

import torch
from torch import Tensor

from kukla.pipeline.dictionary.snap import row_errors


class _SlotResiduals(torch.autograd.Function):
    """‖e‖² per row, ‖r_j‖² after each active entry, the entries in slot-major order (all
    first entries, then all second ones, …; `sizes` entries per slot), residuals walked in
    place in float32 (also under autocast), and the last residual (the full width's, no gradient).

    Backward walks them back from the last (r_{j−1} = r_j + c_j), carrying A_j = Σ_{j' ≥ j}
    ∂L/∂r_{j'}: ∂L/∂z_j = −A_j·d_j, ∂L/∂d_j = −z_j A_j, ∂L/∂e = A_0. Decoder rows are gathered
    again rather than kept, so nothing of size nnz·d is stored.
    """

    @staticmethod
    def forward(ctx, e: Tensor, values: Tensor, W_dec: Tensor, cols: Tensor, order: Tensor,  # type: ignore[override]
                sizes: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        r = e[order].float()  # rows sorted by active count, descending; a copy
        W, z = W_dec.to(r.dtype), values.to(r.dtype)[:, None]
        after = torch.empty_like(z[:, 0])
        rows_dec = r.new_empty(r.shape)  # one buffer for every slot's gathered rows: fresh ones cost page faults
        for n, at in zip(sizes, _slices(sizes)):
            r[:n].addcmul_(torch.index_select(W, 0, cols[at], out=rows_dec[:n]), z[at], value=-1.0)
            torch.linalg.vector_norm(r[:n], dim=1, out=after[at])
        ctx.sizes, ctx.dtypes = sizes, (e.dtype, values.dtype, W_dec.dtype)
        ctx.save_for_backward(r, z, W, cols, order)
        residual = torch.empty_like(r).index_copy_(0, order, r)
        ctx.mark_non_differentiable(residual)
        return torch.linalg.vecdot(e, e), after.square_(), residual

    @staticmethod
    def backward(ctx, grad_first: Tensor, grad_after: Tensor, _: Tensor):  # type: ignore[override]
        r, z, W, cols, order = ctx.saved_tensors
        r = r.clone()
        acc = torch.zeros_like(r)
        rows_dec, product = torch.empty_like(r), torch.empty_like(r)
        minus_grad_z = torch.empty_like(z[:, 0])
        minus_grad_W = torch.zeros_like(W)
        grad_after = 2 * grad_after[:, None].to(r.dtype)
        for n, at in reversed(list(zip(ctx.sizes, _slices(ctx.sizes)))):
            acc[:n].addcmul_(r[:n], grad_after[at])
            torch.index_select(W, 0, cols[at], out=rows_dec[:n])
            torch.sum(torch.mul(acc[:n], rows_dec[:n], out=product[:n]), dim=1, out=minus_grad_z[at])
            minus_grad_W.index_add_(0, cols[at], torch.mul(acc[:n], z[at], out=product[:n]))
            r[:n].addcmul_(rows_dec[:n], z[at])
        acc.addcmul_(r, grad_first[order, None], value=2.0)
        grad_e = torch.empty_like(acc).index_copy_(0, order, acc)
        e_dtype, values_dtype, W_dtype = ctx.dtypes
        return (grad_e.to(e_dtype), minus_grad_z.neg_().to(values_dtype), minus_grad_W.neg_().to(W_dtype),
                None, None, None)


def _slices(sizes: list[int]) -> list[slice]:
    """Each slot's run of entries in slot-major order."""
    ends = list(itertools.accumulate(sizes))
    return [slice(end - n, end) for n, end in zip(sizes, ends)]


def _slots(rows: Tensor, n_rows: int, row_count: int | None) -> tuple[Tensor, Tensor, list[int]]:
    """Rows by active count (descending), the flat entries in slot-major order (slot j: the j-th
    entry of each row that has one, in that row order, so its rows are a leading block), and each
    slot's size. One device read of the count histogram, none when every row has row_count
    entries (TopK)."""
    counts = torch.bincount(rows, minlength=n_rows)
    starts = counts.cumsum(0) - counts
    if row_count is not None:
        order = torch.arange(n_rows, device=rows.device)
        sizes = [n_rows] * row_count
    else:
        order = torch.argsort(counts, descending=True, stable=True)
        sizes = torch.bincount(counts).flip(0).cumsum(0).flip(0)[1:].tolist()  # rows with > j entries
    starts = starts[order]
    return order, torch.cat([starts[:n] + j for j, n in enumerate(sizes)] or [rows[:0]]), sizes


def all_prefix_errors(rows: Tensor, cols: Tensor, values: Tensor, W_dec: Tensor, to_explain: Tensor,
                      cdf: Tensor, l2: bool = False, row_count: int | None = None) -> tuple[Tensor, Tensor]:
    """Σ_b Σ_p w_p ‖e_b − ê_b,p‖² (or ‖·‖ when l2), for the active codes (rows, cols, values) sorted
    row-major with ascending columns; to_explain e = y − b_dec; cdf [F+1] C(l), C(0) = 0, C(F) = 1;
    row_count: every row's number of entries, when the activation fixes it (TopK's k). Also gives
    the full width's residual e − ê [B, d] (detached), which the loop reaches anyway."""
    n_rows, width = to_explain.shape[0], W_dec.shape[0]
    order, slot_major, sizes = _slots(rows, n_rows, row_count)
    first, after, residual = _SlotResiduals.apply(to_explain, values[slot_major], W_dec, cols[slot_major], order, sizes)
    cdf = cdf.to(device=to_explain.device, dtype=to_explain.dtype)
    # the span after each entry ends at the row's next active column, or at F after its last
    last = torch.ones_like(rows, dtype=torch.bool)
    last[:-1] = rows[1:] != rows[:-1]
    nxt = torch.where(last, width, cols.roll(-1))
    first_col = torch.full((n_rows,), width, dtype=cols.dtype, device=cols.device)
    first_col.scatter_reduce_(0, rows, cols, reduce="amin")
    span = (cdf[nxt] - cdf[cols])[slot_major]
    return (cdf[first_col] * row_errors(first, l2)).sum() + (span * row_errors(after, l2)).sum(), residual
