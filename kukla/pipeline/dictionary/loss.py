"""The training objective: Matryoshka reconstruction + aux-k (+ L1 for ReLU), in one pass.

    loss = Σⱼ wⱼ · FVUⱼ + aux_coefficient · FVU_aux (+ l1_coefficient · L1)
    FVUⱼ = Σ_b ‖y_b − ŷ_b^(pⱼ)‖² / Σ_b ‖y_b − ȳ‖²,   ŷ^(p) = b_dec + Σ_{i<p} zᵢ W_dec,i

One encoder pass; the codes are chosen once over the whole dictionary and every prefix
reuses them; the prefix reconstructions are a cumulative sum over segment contributions.
Both terms are normalised variances (OpenAI's normalised MSE), so the aux weight 1/32 and
the level weights mean the same at any activation scale.

aux-k: the top k_aux dead pre-activations per token reconstruct the detached residual
e = y − ŷ (no bias), FVU_aux = Σ‖e − ê‖² / Σ‖e − ē‖²; its gradient trains dead latents'
encoder and decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kukla.errors import KuklaError
from kukla.pipeline.dictionary import reference, sparse
from kukla.pipeline.dictionary.activations import select_batch_topk, select_topk
from kukla.pipeline.dictionary.all_prefix import all_prefix_errors
from kukla.pipeline.dictionary.penalty import sparsity_penalty
from kukla.pipeline.dictionary.prefixes import all_prefix_cdf, cumulative_weight, prefix_weights, tail_mass
from kukla.pipeline.dictionary.reorder import batch_contribution
from kukla.pipeline.dictionary.snap import deviation_total, row_errors

if TYPE_CHECKING:
    from kukla.pipeline.dictionary.model import Dictionary


@dataclass
class TrainOutput:
    """What one training pass gives the trainer."""

    loss: Tensor
    """Scalar to backpropagate."""
    metrics: dict[str, float]
    """mse (raw units, per element), fvu, l0, aux, dead (fraction), l1 (relu), fvu/level_<w> (fixed levels)."""
    fired: Tensor
    """[F] bool: latents active on at least one token of this batch (for `update_dead`)."""
    contribution: Tensor | None = None
    """[F] batch mean of zᵢ²‖W_dec,i‖² when the latents are reordered (for `reorder_latents`)."""


def dead_latents_output(pre_dead: Tensor, W_dec_dead: Tensor, k_aux: int) -> Tensor:
    """ê [B, d_out]: each token's top min(k_aux, #dead) dead pre-activations, relu'd, through their
    decoder rows (no bias).

    Dense over the dead columns: on CPU that beat gathering k_aux decoder rows per token 8×
    (k_aux = d/2 is 5× the main codes' k).
    """
    top = pre_dead.detach().topk(min(k_aux, pre_dead.shape[1]), dim=1, sorted=False).indices
    z = torch.zeros_like(pre_dead).scatter(1, top, pre_dead.gather(1, top).relu())
    return z @ W_dec_dead


def training_loss(dictionary: Dictionary, x: Tensor, y: Tensor | None = None,
                  generator: torch.Generator | None = None, l2: bool = False) -> TrainOutput:
    """Loss, metrics and fired mask for one batch of raw activations (x; and y for a transcoder);
    l2: the snap loss's unsquared reconstruction error (`kukla.pipeline.dictionary.snap`)."""
    cfg = dictionary.cfg
    rule = cfg.activation_rule
    if rule == "jumprelu":
        raise KuklaError("a JumpReLU dictionary (loaded from SAELens) is inference-only here: train batchtopk instead")
    W_enc, b_enc, W_dec, b_dec = dictionary.W_enc, dictionary.b_enc, dictionary.W_dec, dictionary.b_dec
    n_rows, width = x.shape[0], cfg.width
    all_prefixes = cfg.prefix_scheme == "all"
    bounds, weights = ([width], [1.0]) if all_prefixes else prefix_weights(cfg, generator)
    cdf = all_prefix_cdf(width, cfg.n_prefixes) if all_prefixes else cumulative_weight(bounds, weights, width)
    x_c = dictionary.centered_input(x)
    target = dictionary.scaled_target(x, y)
    dead = dictionary.dead_mask()
    use_aux = cfg.aux_coefficient > 0 and bool(dead.any())
    path = sparse if (cfg.sparse_path and rule != "relu") else reference

    if path is sparse:
        with torch.no_grad():
            pre = x_c @ W_enc + b_enc
    else:
        pre_grad = x_c @ W_enc + b_enc
        pre = pre_grad.detach()
    if rule == "relu":  # dense codes z = relu(pre), whatever sparse_path says
        z = pre_grad.relu()
        fired, n_active = (pre > 0).any(dim=0), (pre > 0).sum()
        segments = reference.dense_segments(z, W_dec, bounds)
        if all_prefixes:
            rows, cols = (pre > 0).nonzero(as_tuple=True)
            values = z[rows, cols]
    else:
        rows, cols = select_topk(pre, int(cfg.k)) if rule == "topk" else select_batch_topk(pre, float(cfg.k))
        if path is sparse:
            gathered = sparse.encode_at(dictionary.scaled_input(x), dictionary.input_bias, W_enc, b_enc, pre,
                                        rows, cols)
        else:
            gathered = pre_grad[rows, cols]
        values = gathered.relu()
        segments = path.decode_segments(rows, cols, values, W_dec, bounds, n_rows)
        fired = torch.zeros(width, dtype=torch.bool, device=x.device)
        fired[cols[values > 0]] = True
        n_active = (values > 0).sum()
    to_explain = (target - b_dec).float()
    total_var = deviation_total(target, False)
    partial = segments.float().cumsum(dim=1)  # [B, G, d]: reconstruction minus b_dec at each prefix
    row_sq = (to_explain[:, None, :] - partial).pow(2).sum(dim=2)  # [B, G]
    if all_prefixes:  # G = 1 here: the full width, for the metrics and aux-k
        loss = all_prefix_errors(rows, cols, values, W_dec, to_explain, cdf, l2) / deviation_total(target, l2)
    else:
        error = row_errors(row_sq, l2).sum(dim=0) / deviation_total(target, l2)
        loss = (error * torch.tensor(weights, device=error.device)).sum()
    sq_err, residual = row_sq.sum(dim=0), to_explain - partial[:, -1]
    fvu = sq_err / total_var

    aux = torch.zeros((), device=loss.device)
    if use_aux:
        residual = residual.detach()
        dead_cols = dead.nonzero().squeeze(1)
        if path is sparse:
            pre_dead = sparse.columns_at(dictionary.scaled_input(x), dictionary.input_bias, W_enc, b_enc, pre,
                                         dead_cols)
        else:
            pre_dead = pre_grad[:, dead_cols]
        aux_out = dead_latents_output(pre_dead, W_dec[dead_cols], int(cfg.aux_k)).float()
        aux = (residual - aux_out).pow(2).sum() / (residual - residual.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        loss = loss + cfg.aux_coefficient * aux
    l1 = torch.zeros((), device=loss.device)
    if rule == "relu":
        l1 = sparsity_penalty(z, W_dec, tail_mass(cdf), (total_var / n_rows).sqrt(), cfg.penalty, cfg.log_epsilon)
        coefficient = dictionary.penalty_coefficient if cfg.target_l0 is not None else cfg.l1_coefficient
        loss = loss + coefficient * l1

    names = ["mse", "fvu", "l0", "aux", "dead"] + (["l1"] if rule == "relu" else [])
    figures = [sq_err[-1].detach() / (n_rows * dictionary.d_out) / dictionary.target_scale.float() ** 2,
               fvu[-1].detach(), n_active / n_rows, aux.detach(), dead.float().mean()]
    figures += [l1.detach()] if rule == "relu" else []
    if cfg.prefix_scheme == "levels":
        names += [f"fvu/level_{w}" for w in bounds]
        figures += list(fvu.detach())
    metrics = dict(zip(names, torch.stack([f.float().to(loss.device) for f in figures]).tolist()))
    contribution = None
    if cfg.reorder_latents:
        if rule == "relu" and not all_prefixes:
            rows, cols = (pre > 0).nonzero(as_tuple=True)
            values = pre[rows, cols]
        contribution = batch_contribution(cols, values, W_dec, n_rows)
    return TrainOutput(loss=loss, metrics=metrics, fired=fired, contribution=contribution)
