"""The training objective: Matryoshka reconstruction + aux-k (+ the rule's sparsity penalty), in one pass,
with its statistics over the global batch.

    loss = Σⱼ wⱼ · FVUⱼ + aux_coefficient · FVU_aux (+ λ · penalty: ReLU's L1, JumpReLU's L0)
    FVUⱼ = Σ_b ‖y_b − ŷ_b^(pⱼ)‖² / Σ_b ‖y_b − ȳ‖²,   ŷ^(p) = b_dec + Σ_{i<p} zᵢ W_dec,i

One encoder pass; the codes are chosen once over the whole dictionary and every prefix
reuses them; the prefix reconstructions are a cumulative sum over segment contributions.
Both terms are normalised variances (OpenAI's normalised MSE), so the aux weight 1/32 and
the level weights mean the same at any activation scale.

aux-k: the top k_aux dead pre-activations per token reconstruct the detached residual
e = y − ŷ (no bias), FVU_aux = Σ‖e − ê‖² / Σ‖e − ē‖²; its gradient trains dead latents'
encoder and decoder. The dead latents are looked for among a fixed number of candidates, the
longest-unfired ones (`Dictionary.aux_candidates`), so the step never reads how many are dead.

Two paths compute it: the dense reference math here (plain autograd over B×F matrices), and
`sparse.py`, the same values and gradients without the dense B×F gradient; the tests hold the
two together. Both take the selected entries as (rows, cols), sorted row-major.

Snap loss (Chanin et al.): late in training, reconstruct with the L2 norm ‖y − ŷ‖, not its square.
The squared error lets a latent trade a little error on many rows for a lot on a few; the
unsquared norm weighs every row's error linearly, which snaps latents onto cleaner features.
Both are normalised by the same quantity at zero codes (Σ‖y − ȳ‖² or Σ‖y − ȳ‖), so the
weights of the other terms keep their meaning.

The global batch (`GlobalBatch`), so the number of processes cannot change the loss: under data
parallelism each rank holds an equal share of every global batch. The statistics
that define the loss are taken over the whole global batch, never over one share: the target's
variance (FVU's and aux-k's denominators) and BatchTopK's cutoff. A rank's loss is then its
rows' squared errors over the global variance per row, and the mean of the ranks' losses (what
averaged gradients descend) is exactly the loss one process computes on the global batch.

`GlobalBatch()` is one process holding the whole batch (every reduction is the identity);
`kukla.pipeline.train.distributed.RankShare` reduces over torch.distributed ranks. Reductions
only ever see detached tensors: they shape the loss, gradients never flow through them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kukla.pipeline.dictionary import sparse
from kukla.pipeline.dictionary.model import Dictionary, batch_contribution
from kukla.pipeline.dictionary.prefixes import prefix_cdf, prefix_weights, tail_mass


class GlobalBatch:
    """One process holding the whole batch."""

    world: int = 1
    """How many equal shares the global batch is cut into."""

    def sum(self, t: Tensor) -> Tensor:
        """Elementwise sum of `t` over every share."""
        return t

    def gather(self, t: Tensor) -> Tensor:
        """Every share's `t` concatenated along dim 0 (same shape on every share)."""
        return t

    def deviations(self, t: Tensor) -> tuple[Tensor, int]:
        """This share's t − t̄ (t̄ the global batch's mean; detached, float32) and N, the global batch's rows."""
        t = t.detach().float()
        n = t.shape[0] * self.world
        return t - self.sum(t.sum(dim=0)) / n, n

    def variance_per_row(self, t: Tensor) -> Tensor:
        """Σ_b ‖t_b − t̄‖² / N over the global batch: FVU's denominator per row."""
        deviation, n = self.deviations(t)
        return self.sum(deviation.pow(2).sum()) / n


ONE_PROCESS = GlobalBatch()


@dataclass
class TrainOutput:
    """What one training pass gives the trainer."""

    loss: Tensor
    """Scalar to backpropagate."""
    metrics: dict[str, Tensor]
    """0-d tensors on the step's device, read only when logged (reading them waits for the device):
    mse (raw units, per element), fvu, l0, aux, the rule's penalty (relu: l1, jumprelu: l0_penalty),
    fvu/level_<w> (fixed levels). Dead latents are counted after the step's firing, where they are
    logged (`dead_pct`), so a metrics line carries one dead figure, not two a step apart."""
    fired: Tensor
    """[F] bool: latents active on at least one token of this batch (for `update_dead`)."""
    contribution: Tensor | None = None
    """[F] batch mean of zᵢ²‖W_dec,i‖² when the latents are reordered (for `reorder_latents`)."""


def dead_latents_output(pre_dead: Tensor, W_dec_dead: Tensor, k_aux: int) -> Tensor:
    """ê [B, d_out]: each token's top min(k_aux, #columns) pre-activations of the aux-k candidates
    (non-dead ones masked to −inf), relu'd, through their decoder rows (no bias).

    Dense over the candidate columns: on CPU that beat gathering k_aux decoder rows per token 8×
    (k_aux = d/2 is 5× the main codes' k).
    """
    top = pre_dead.detach().topk(min(k_aux, pre_dead.shape[1]), dim=1, sorted=False).indices
    z = torch.zeros_like(pre_dead).scatter(1, top, pre_dead.gather(1, top).relu())
    return z @ W_dec_dead


def training_loss(dictionary: Dictionary, x: Tensor, y: Tensor | None = None,
                  generator: torch.Generator | None = None, batch: GlobalBatch = ONE_PROCESS,
                  l2: bool = False) -> TrainOutput:
    """Loss, metrics and fired mask for one batch of raw activations (x; and y for a transcoder);
    l2: the snap loss's unsquared reconstruction error (see the module docstring).

    Under data parallelism x is this rank's share of the global batch and `batch` reduces over
    the shares (see `GlobalBatch`). Nothing here reads a device value back to the host, except
    where a shape depends on the codes: BatchTopK all-prefix's count histogram (it sizes the slot
    walk), drawn prefixes on the dense path (its slices) and ReLU's active entries.
    """
    cfg, rule = dictionary.cfg, dictionary.rule
    W_enc, b_enc, W_dec, b_dec = dictionary.W_enc, dictionary.b_enc, dictionary.W_dec, dictionary.b_dec
    n_rows, width = x.shape[0], cfg.width
    all_prefixes = cfg.prefixes == "all" or cfg.spread_levels  # every prefix, by the closed form
    bounds, weights = prefix_weights(cfg, generator)
    cdf = prefix_cdf(cfg, bounds, weights, x.device)
    x_c = dictionary.centered_input(x)
    target = dictionary.scaled_target(x, y)
    aux_cols = dictionary.aux_candidates() if cfg.aux_coefficient > 0 else None
    dead_mask = dictionary.dead_mask()
    use_sparse = dictionary.use_sparse_path and rule.selects
    decode, errors_of = ((sparse.decode_segments, sparse.prefix_errors) if use_sparse
                         else (decode_segments, prefix_errors))

    if use_sparse:
        x_s = dictionary.scaled_input(x)  # what the sparse backwards re-centre, once for codes and aux-k
        with torch.no_grad():
            pre = torch.addmm(b_enc, x_c, W_enc)
    else:
        pre_grad = torch.addmm(b_enc, x_c, W_enc)
        pre = pre_grad.detach()
    if not rule.selects:  # dense codes, whatever sparse_path says
        z = rule.codes(dictionary, pre_grad)
        active = z.detach() > 0
        segments = None if all_prefixes else dense_segments(z, W_dec, bounds)
        fired, n_active = active.any(dim=0), active.sum()
        if all_prefixes or cfg.reorder_latents:
            rows, cols = active.nonzero(as_tuple=True)
            values = z[rows, cols]
    else:
        rows, cols = rule.select(pre, cfg, batch)
        if use_sparse:
            gathered = sparse.encode_at(x_s, dictionary.input_bias, W_enc, b_enc, pre, rows, cols)
        else:
            gathered = pre_grad[rows, cols]
        values = gathered.relu()
        segments = None if all_prefixes else decode(rows, cols, values, W_dec, bounds, n_rows)
        active = values.detach() > 0
        fired = torch.zeros(width, device=x.device).index_add_(0, cols, active.float()) > 0
        n_active = active.sum()
    to_explain = (target - b_dec).float()
    if all_prefixes:  # every prefix at once from the active codes, the full width's residual with them
        errors, residual = all_prefix_errors(rows, cols, values, W_dec, to_explain, cdf, l2,
                                             row_count=rule.rows_per_token(cfg))
        sq_err = residual.pow(2).sum()[None]
    else:
        sq_err, residual = errors_of(to_explain, segments.float())  # [G] and [B, d]
    total_var = (batch.variance_per_row(target) * n_rows).clamp_min(1e-12)  # this share at the global variance
    fvu = sq_err / total_var
    if l2:  # snap loss: Σ‖r‖ over Σ‖y − ȳ‖ (global over the batch's shares, like the variance)
        scale = (deviation_norms_per_row(batch, target) * n_rows).clamp_min(1e-12)
    if all_prefixes:
        loss = errors / (scale if l2 else total_var)
    elif l2:
        loss = sum(w * n for w, n in zip(weights, prefix_norms(to_explain, segments.float()).unbind())) / scale
    else:
        loss = sum(w * f for w, f in zip(weights, fvu.unbind()))

    aux = torch.zeros((), device=loss.device)
    if aux_cols is not None:
        dead = dead_mask[aux_cols]
        if use_sparse:
            pre_dead = sparse.columns_at(x_s, dictionary.input_bias, W_enc, b_enc, pre, aux_cols)
        else:
            pre_dead = pre_grad[:, aux_cols]
        pre_dead = torch.where(dead, pre_dead, float("-inf"))
        aux_out = dead_latents_output(pre_dead, W_dec[aux_cols], int(cfg.aux_k)).float()
        aux_var = (batch.variance_per_row(residual) * n_rows).clamp_min(1e-12)
        aux = (residual - aux_out).pow(2).sum() / aux_var * dead.any()
        loss = loss + cfg.aux_coefficient * aux
    if rule.penalty_metric is not None:
        penalty = rule.penalty(dictionary, pre_grad, z, tail_mass(cdf), (total_var / n_rows).sqrt())
        coefficient = dictionary.penalty_coefficient if cfg.target_l0 is not None else rule.penalty_weight(cfg)
        loss = loss + coefficient * penalty

    metrics = {"mse": sq_err[-1].detach() / (n_rows * dictionary.d_out) / dictionary.target_scale.float() ** 2,
               "fvu": fvu[-1].detach(), "l0": n_active / n_rows, "aux": aux.detach()}
    if rule.penalty_metric is not None:
        metrics[rule.penalty_metric] = penalty.detach()
    if cfg.prefixes == "levels" and not all_prefixes:
        metrics.update({f"fvu/level_{w}": f for w, f in zip(bounds, fvu.detach().unbind())})
    contribution = batch_contribution(cols, values, W_dec, n_rows) if cfg.reorder_latents else None
    return TrainOutput(loss=loss, metrics=metrics, fired=fired, contribution=contribution)


# --- the dense reference path ------------------------------------------------------------------

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


# --- snap loss ---------------------------------------------------------------------------------

def row_errors(squared_norms: Tensor, l2: bool) -> Tensor:
    """Each row's reconstruction error from its ‖r‖²: itself, or ‖r‖ under the snap loss."""
    return squared_norms.clamp_min(1e-30).sqrt() if l2 else squared_norms


def snap_step(fraction: float | None, total_steps: int) -> int | None:
    """The first step trained with the L2 loss, or None when the snap loss is off."""
    return None if fraction is None else math.ceil(fraction * total_steps)


def deviation_norms_per_row(batch: GlobalBatch, t: Tensor) -> Tensor:
    """Σ_b ‖t_b − t̄‖ / N over the global batch: the snap loss's denominator per row (as
    `GlobalBatch.variance_per_row` is the FVU's)."""
    deviation, n = batch.deviations(t)
    return batch.sum(deviation.pow(2).sum(dim=1).sqrt().sum()) / n


def prefix_norms(target: Tensor, segments: Tensor) -> Tensor:
    """[G] Σ_b ‖t_b − Σ_{i≤j} s_bi‖ of the prefix reconstructions (segments [B, G, d])."""
    return row_errors((target[:, None, :] - segments.cumsum(dim=1)).pow(2).sum(dim=2), True).sum(dim=0)


# --- every prefix at once (all-prefix Matryoshka, block size 1) --------------------------------
# For a row with active latents i₁ < … < i_m, the prefix of length p reconstructs with the
# latents below p, so its residual is r_j = e − Σ_{l ≤ j} c_l (c_l = zₗ W_dec,iₗ) for every p in
# (i_j, i_{j+1}]: only m + 1 distinct residuals. Hence
#
#     Σ_{p=1..F} w_p ‖e − ê_p‖² = Σ_{j=0..m} (C(i_{j+1}) − C(i_j)) · ‖r_j‖²,   i₀ = 0, i_{m+1} = F,
#
# with C the cumulative prefix weight. The ‖r_j‖² come from one [B, d] residual updated in place
# by slot: step j subtracts every row's j-th contribution, r_j = r_{j−1} − c_j. With rows sorted
# by active count (descending), the rows that have a j-th entry are a leading block, so BatchTopK's
# uneven rows cost Σ_b m_b·d gathered decoder numbers and no padding, never B·F·d, and each step
# works on one cache-sized [B, d] block rather than a [B, m, d] tensor (or a B·m²·d Gram).


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
