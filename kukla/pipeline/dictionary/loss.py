"""The training objective: Matryoshka reconstruction + aux-k (+ the rule's sparsity penalty), in one pass.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kukla.pipeline.dictionary import reference, sparse
from kukla.pipeline.dictionary.global_batch import ONE_PROCESS, GlobalBatch
from kukla.pipeline.dictionary.all_prefix import all_prefix_errors
from kukla.pipeline.dictionary.prefixes import prefix_cdf, prefix_weights, tail_mass
from kukla.pipeline.dictionary.reorder import batch_contribution
from kukla.pipeline.dictionary.snap import deviation_norms_per_row, prefix_norms

if TYPE_CHECKING:
    from kukla.pipeline.dictionary.model import Dictionary


@dataclass
class TrainOutput:
    """What one training pass gives the trainer."""

    loss: Tensor
    """Scalar to backpropagate."""
    metrics: dict[str, Tensor]
    """0-d tensors on the step's device, read only when logged (reading them waits for the device):
    mse (raw units, per element), fvu, l0, aux, dead (fraction), the rule's penalty (relu: l1,
    jumprelu: l0_penalty), fvu/level_<w> (fixed levels)."""
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
    l2: the snap loss's unsquared reconstruction error (`kukla.pipeline.dictionary.snap`).

    Under data parallelism x is this rank's share of the global batch and `batch` reduces over
    the shares (see `global_batch`). Nothing here reads a device value back to the host, except
    where a shape depends on the codes: BatchTopK all-prefix's count histogram (it sizes the slot
    walk), drawn prefixes on the dense path (its slices) and ReLU's active entries.
    """
    cfg, rule = dictionary.cfg, dictionary.rule
    W_enc, b_enc, W_dec, b_dec = dictionary.W_enc, dictionary.b_enc, dictionary.W_dec, dictionary.b_dec
    n_rows, width = x.shape[0], cfg.width
    all_prefixes = cfg.prefixes == "all" or cfg.spread_levels  # every prefix, by the closed form
    bounds, weights = prefix_weights(cfg, generator) if cfg.prefixes != "all" else ([width], [1.0])
    cdf = prefix_cdf(cfg, bounds, weights, x.device)
    x_c = dictionary.centered_input(x)
    target = dictionary.scaled_target(x, y)
    aux_cols = dictionary.aux_candidates() if cfg.aux_coefficient > 0 else None
    dead_mask = dictionary.dead_mask()
    path = sparse if (dictionary.use_sparse_path and rule.selects) else reference

    if path is sparse:
        x_s = dictionary.scaled_input(x)  # what the sparse backwards re-centre, once for codes and aux-k
        with torch.no_grad():
            pre = torch.addmm(b_enc, x_c, W_enc)
    else:
        pre_grad = torch.addmm(b_enc, x_c, W_enc)
        pre = pre_grad.detach()
    if not rule.selects:  # dense codes, whatever sparse_path says
        z = rule.codes(dictionary, pre_grad)
        active = z.detach() > 0
        segments = None if all_prefixes else reference.dense_segments(z, W_dec, bounds)
        fired, n_active = active.any(dim=0), active.sum()
        if all_prefixes or cfg.reorder_latents:
            rows, cols = active.nonzero(as_tuple=True)
            values = z[rows, cols]
    else:
        rows, cols = rule.select(pre, cfg, batch)
        if path is sparse:
            gathered = sparse.encode_at(x_s, dictionary.input_bias, W_enc, b_enc, pre, rows, cols)
        else:
            gathered = pre_grad[rows, cols]
        values = gathered.relu()
        segments = None if all_prefixes else path.decode_segments(rows, cols, values, W_dec, bounds, n_rows)
        active = values.detach() > 0
        fired = torch.zeros(width, device=x.device).index_add_(0, cols, active.float()) > 0
        n_active = active.sum()
    to_explain = (target - b_dec).float()
    if all_prefixes:  # every prefix at once from the active codes, the full width's residual with them
        errors, residual = all_prefix_errors(rows, cols, values, W_dec, to_explain, cdf, l2,
                                             row_count=rule.rows_per_token(cfg))
        sq_err = residual.pow(2).sum()[None]
    else:
        sq_err, residual = path.prefix_errors(to_explain, segments.float())  # [G] and [B, d]
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
        if path is sparse:
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
               "fvu": fvu[-1].detach(), "l0": n_active / n_rows, "aux": aux.detach(),
               "dead": dead_mask.float().mean()}
    if rule.penalty_metric is not None:
        metrics[rule.penalty_metric] = penalty.detach()
    if cfg.prefixes == "levels" and not all_prefixes:
        metrics.update({f"fvu/level_{w}": f for w, f in zip(bounds, fvu.detach().unbind())})
    contribution = batch_contribution(cols, values, W_dec, n_rows) if cfg.reorder_latents else None
    return TrainOutput(loss=loss, metrics=metrics, fired=fired, contribution=contribution)
