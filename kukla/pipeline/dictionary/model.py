"""The dictionary: parameters, inference on raw activations, constraints, and the updates between steps.

Notation (docs/ARCHITECTURE.md): x_s = x·input_scale, pre = (x_s − b_dec)·W_enc + b_enc for an SAE
(x_s·W_enc + b_enc for a transcoder), ŷ_s = z·W_dec + b_dec, output ŷ = ŷ_s / target_scale.
The scales (SAELens-style √d / E‖x‖) are buffers, so every public method takes raw activations.
The codes come from the activation rule (`rules/`); training is `loss.training_loss(dictionary, …)`,
which reads the dictionary (the model never calls into the loss). Between steps the trainer
renormalises (`normalize_decoder`), counts dead latents, reorders latents (`reorder_latents`)
and steers a penalty's λ (`adjust_penalty`); all of these live here, beside the state they change.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kukla.errors import KuklaError
from kukla.pipeline.dictionary.config import DictionaryConfig


_AUX_COLUMN_STEP = 128  # aux-k candidates come in multiples of this


class Dictionary(nn.Module):
    """A sparse dictionary (SAE or transcoder) as configured by `DictionaryConfig`."""

    def __init__(self, cfg: DictionaryConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.rule = cfg.rule
        d_in, d_out, width = cfg.d_in, self.d_out, cfg.width
        self.W_enc = nn.Parameter(torch.empty(d_in, width))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(torch.empty(width, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("target_scale", torch.tensor(1.0))
        self.register_buffer("threshold", torch.full((width,), math.nan))
        self.register_buffer("inference_l0", torch.tensor(math.nan))
        self.register_buffer("l0_cap", torch.tensor(0, dtype=torch.long))  # BatchTopK inference; 0: none
        self.register_buffer("tokens_since_fired", torch.zeros(width, dtype=torch.long))
        if cfg.target_l0 is not None:  # the penalty weight λ that the L0 controller moves (`adjust_penalty`)
            self.register_buffer("penalty_coefficient", torch.tensor(float(self.rule.penalty_weight(cfg))))
        if cfg.reorder_latents:  # running mean of zᵢ²‖W_dec,i‖² that orders the latents (`reorder_latents`)
            self.register_buffer("contribution", torch.zeros(width))
        self.use_sparse_path = cfg.sparse_path
        """The path `training_loss` takes; `train.sweep.choose_sparse_path` may pick dense where it is faster."""
        self.aux_columns = 0
        """How many longest-unfired latents aux-k searches for dead ones (set by `count_dead`)."""
        self.metadata: dict[str, Any] = {}  # what load_dictionary read beside the weights (kukla.json)
        self.rule.add_state(self)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SAE: random unit decoder rows, W_enc = W_decᵀ. Transcoder: random unit encoder columns, W_dec = 0."""
        if self.cfg.transcoder:
            directions = torch.randn(self.cfg.width, self.cfg.d_in)
            self.W_enc.copy_((directions / directions.norm(dim=1, keepdim=True)).t())
            self.W_dec.zero_()
        else:
            directions = torch.randn(self.cfg.width, self.d_out)
            self.W_dec.copy_(directions / directions.norm(dim=1, keepdim=True))
            self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    # --- shape ---------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_out(self) -> int:
        return int(self.cfg.d_out or self.cfg.d_in)

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def levels(self) -> list[int]:
        """Matryoshka level widths (cumulative, ending at width); [width] when there are none."""
        return [int(w) for w in self.cfg.levels] if self.cfg.levels else [self.cfg.width]

    @property
    def calibrated(self) -> bool:
        """Whether the calibrated inference threshold has been set (BatchTopK needs it to encode)."""
        return not bool(torch.isnan(self.threshold).any())

    # --- scaling ---------------------------------------------------------------------------
    @torch.no_grad()
    def set_scales(self, input_mean_norm: float, target_mean_norm: float | None = None) -> None:
        """Scale activations to E‖x‖ = √d (SAELens' `expected_average_only_in`), from the store's mean norms.

        Call before `initialize`. A transcoder's target gets its own scale; an SAE's is its input's.
        """
        self.input_scale.fill_(math.sqrt(self.d_in) / input_mean_norm)
        if self.cfg.transcoder:
            if target_mean_norm is None:
                raise KuklaError("a transcoder needs the target hook's mean norm to scale its targets")
            self.target_scale.fill_(math.sqrt(self.d_out) / target_mean_norm)
        else:
            self.target_scale.copy_(self.input_scale)

    def scaled_input(self, x: Tensor) -> Tensor:
        """x_s = x · input_scale."""
        return x.to(self.W_enc.dtype) * self.input_scale

    @property
    def input_bias(self) -> Tensor | None:
        """What the encoder subtracts from x_s: b_dec for an SAE, nothing for a transcoder."""
        return None if self.cfg.transcoder else self.b_dec

    def centered_input(self, x: Tensor) -> Tensor:
        """x_s − b_dec (SAE) or x_s (transcoder): what the encoder multiplies."""
        bias = self.input_bias
        return self.scaled_input(x) if bias is None else self.scaled_input(x) - bias

    def scaled_target(self, x: Tensor, y: Tensor | None) -> Tensor:
        """The target in training units: y·target_scale (a transcoder) or x·input_scale (an SAE)."""
        if self.cfg.transcoder:
            if y is None:
                raise KuklaError("a transcoder trains on (input, target) pairs: pass the target hook's rows as y")
            return y.to(self.W_dec.dtype) * self.target_scale
        return x.to(self.W_dec.dtype) * self.input_scale

    def pre_activations(self, x: Tensor) -> Tensor:
        return self.centered_input(x) @ self.W_enc + self.b_enc

    # --- inference -------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Inference codes [B, F], by the activation rule (`rules/`)."""
        return self.rule.encode(self, self.pre_activations(x))

    def decode(self, z: Tensor) -> Tensor:
        """Output in raw units of the target: (z·W_dec + b_dec) / target_scale."""
        return (z @ self.W_dec + self.b_dec) / self.target_scale

    @property
    def output_directions(self) -> Tensor:
        """Decoder rows in the target's raw units (W_dec / target_scale, the saved W_dec): what one
        unit of each latent adds to the output. W_dec itself is in training units."""
        return self.W_dec / self.target_scale

    def decode_prefixes(self, z: Tensor, widths: list[int]) -> list[Tensor]:
        """`decode` using only the first w latents, for each increasing w: a cumulative sum over
        the segments between widths, so all prefixes cost one decode, not one each."""
        outs, partial, start = [], self.b_dec.expand(z.shape[0], -1), 0
        for width in widths:
            partial = partial + z[:, start:width] @ self.W_dec[start:width]
            outs.append(partial / self.target_scale)
            start = width
        return outs

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction (SAE) or prediction of the target (transcoder), in raw units."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def initialize(self, x: Tensor, y: Tensor | None = None) -> None:
        """b_dec = geometric median of a sample (of the target, in training units); call after set_scales.

        A transcoder's decoder is zero at this point, so its first predictions are that median.
        """
        self.b_dec.copy_(geometric_median(self.scaled_target(x, y).float()).to(self.b_dec.dtype))

    @torch.no_grad()
    def project_decoder_grads(self) -> None:
        """Remove each decoder row's gradient component along the row (SAE), before the step.

        With unit rows, that keeps ‖W_dec,i‖ = 1 to first order, so the step does not fight
        the renormalisation in `normalize_decoder`.
        """
        if self.cfg.transcoder or self.W_dec.grad is None:
            return
        rows = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        grad = self.W_dec.grad
        grad -= (grad * rows).sum(dim=1, keepdim=True) * rows

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows (SAE), after the step; transcoders are not norm-constrained."""
        if not self.cfg.transcoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # --- dead latents ----------------------------------------------------------------------
    @torch.no_grad()
    def update_dead(self, fired: Tensor, n_tokens: int) -> None:
        """Advance every latent's tokens-since-fired by n_tokens; reset the ones that fired.

        Under DDP pass the all-reduced (OR) fired mask and the global token count.
        """
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired.to(self.tokens_since_fired.device), 0)  # no nonzero(): no wait

    def dead_mask(self) -> Tensor:
        """Latents that have not fired for `dead_tokens` tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    @torch.no_grad()
    def count_dead(self) -> int:
        """Read how many latents are dead (one wait for the device) and size aux-k's candidates by it.

        The trainer calls this when it logs and when it checkpoints, never inside a step: between
        two calls aux-k looks for dead latents among the same number of longest-unfired latents,
        rounded up to a multiple of 128 so latents dying in between can join, and so a step's
        shapes stay fixed.
        """
        dead = int(self.dead_mask().sum())
        self.aux_columns = min(self.width, -(-dead // _AUX_COLUMN_STEP) * _AUX_COLUMN_STEP)
        return dead

    def aux_candidates(self) -> Tensor | None:
        """Latents aux-k may use, ascending (the `aux_columns` longest-unfired); None when none was dead."""
        if self.aux_columns == 0:
            return None
        return self.tokens_since_fired.topk(self.aux_columns, sorted=False).indices.sort().values


# --- initialisation ----------------------------------------------------------------------------

@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """argmin_m Σᵢ‖pointsᵢ − m‖ for points [N, d], by Weiszfeld's reweighted means (float64): the
    decoder bias an SAE starts from. Unlike the mean it is robust to the few huge-norm tokens
    (BOS, attention sinks) that drag the mean away from where most activations live."""
    pts = points.double()
    median = pts.mean(dim=0)
    for _ in range(max_iter):
        dist = (pts - median).norm(dim=1).clamp_min(1e-12)  # a point at the median gets a huge, finite weight
        weights = 1.0 / dist
        new = (weights[:, None] * pts).sum(dim=0) / weights.sum()
        step = (new - median).norm()
        median = new
        if step <= tol * (1.0 + median.norm()):
            break
    return median.to(points.dtype)


# --- latent reordering (Nabeshima) ---------------------------------------------------------------
# A prefix scheme makes position matter: the first latents are in every prefix. Sorting by a
# running mean of each latent's contribution zᵢ²‖W_dec,i‖² after every step lets a latent that
# turns out general move forward into the short prefixes, instead of staying where init put it.
#
# A permutation of the latents changes no function of the dictionary, so everything indexed by
# latent moves together: encoder columns, encoder bias, decoder rows, their Adam moments, and the
# per-latent buffers (dead counters, threshold, the running contribution itself). All of them are
# in the dictionary's and the optimiser's state dicts, so a checkpoint resumes exactly.

CONTRIBUTION_DECAY = 0.99
"""Weight of the past in the running mean of each latent's contribution (≈ the last 100 batches)."""


def batch_contribution(cols: Tensor, values: Tensor, W_dec: Tensor, n_rows: int) -> Tensor:
    """[F] mean over the batch's rows of zᵢ²‖W_dec,i‖², from the active entries (cols, values)."""
    squared = torch.zeros(W_dec.shape[0], dtype=torch.float32, device=W_dec.device)
    squared.index_add_(0, cols, values.detach().float().pow(2))
    return squared * W_dec.detach().float().pow(2).sum(dim=1) / max(n_rows, 1)


#: Per-latent parameters and the dimension that indexes latents.
_LATENT_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "log_threshold": 0}
#: Per-latent buffers (indexed by latent along dim 0).
_LATENT_BUFFERS = ("threshold", "tokens_since_fired", "contribution")


def _latent_tensors(dictionary: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[Tensor, int]]:
    """Every per-latent parameter with its Adam moments, and the dimension that indexes latents."""
    out = []
    for name, dim in _LATENT_DIM.items():
        param = getattr(dictionary, name, None)
        if param is None:  # a rule's own parameter (JumpReLU's threshold) that this one lacks
            continue
        out += [(param, dim)] + [(v, dim) for v in optimizer.state.get(param, {}).values()
                                 if torch.is_tensor(v) and v.shape == param.shape]
    return out


@torch.no_grad()
def reorder_latents(dictionary: nn.Module, optimizer: torch.optim.Optimizer, contribution: Tensor) -> Tensor:
    """Fold this batch's contribution into the running mean, then sort the latents by it
    (descending; stable, so ties keep their order). Returns the permutation applied."""
    running = dictionary.contribution
    running.mul_(CONTRIBUTION_DECAY).add_(contribution.to(running), alpha=1 - CONTRIBUTION_DECAY)
    order = torch.argsort(running, descending=True, stable=True)
    for tensor, dim in _latent_tensors(dictionary, optimizer):
        tensor.copy_(tensor.index_select(dim, order.to(tensor.device)))
    for name in _LATENT_BUFFERS:
        buffer = getattr(dictionary, name)
        buffer.copy_(buffer.index_select(0, order.to(buffer.device)))
    return order


# --- resampling (TopK, BatchTopK) ----------------------------------------------------------------
# Two latents can share a parent p and one child c as a rotated pair, u ≈ (p + c)/√2 and
# v ≈ (p − c)/√2: both fire on parent rows, the full width is exact and BatchTopK does not charge
# the extra code while L0 is below k, so no loss term undoes it (issue 11; benchmarks/RESULTS.md,
# science round 6). At `resample_at` the trainer makes each pair that fires together on more than
# `cofire_ratio` of the more frequent one's rows one latent (its mean contribution on their shared
# rows), then restarts every dead latent, and those the merges freed, at the residual of a batch
# row drawn ∝ its squared error (Anthropic's 2023 resampling), with fresh Adam moments.

RESAMPLE_MIN_SHARED = 16
"""Rows a pair must share in the batch before its co-firing counts: below that a ratio is noise
(two rare latents meeting on 3 of 4 rows), and merging a good latent loses its feature."""
RESAMPLE_ENCODER_SCALE = 0.2
"""A restarted encoder column's norm, as a fraction of the mean live column's (Anthropic's 0.2)."""


def _selected_codes(dictionary: Dictionary, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The training rule's active entries on x: (rows, cols, values > 0), row-major."""
    pre = dictionary.pre_activations(x)
    rows, cols = dictionary.rule.select(pre, dictionary.cfg)
    values = pre[rows, cols].relu()
    active = values > 0
    return rows[active], cols[active], values[active]


def cofiring_pairs(rows: Tensor, cols: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """(i, j, n) for every pair i < j of latents active on the same rows, n the rows they share.
    The entries are row-major (as `Rule.select` gives them); a row with m entries adds m² pairs."""
    per_row = torch.bincount(rows)
    start = torch.cumsum(per_row, 0) - per_row
    repeat = per_row[rows]
    first = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), repeat)
    before = torch.repeat_interleave(torch.cumsum(repeat, 0) - repeat, repeat)
    offset = torch.arange(first.numel(), device=rows.device) - before  # each entry's partner within its row
    i, j = cols[first], cols[start[rows[first]] + offset]
    keys, shared = torch.unique(i[i < j] * width + j[i < j], return_counts=True)
    return keys // width, keys % width, shared


@torch.no_grad()
def resample_latents(dictionary: Dictionary, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor | None,
                     generator: torch.Generator) -> tuple[int, int]:
    """Merge co-firing pairs, then restart dead and freed latents, on one (global) batch; returns
    (pairs merged, latents restarted). Which latents change rests on integer counts only, so every
    rank given the whole global batch changes the same ones (the trainer then broadcasts rank 0's
    weights, whose restarted rows rest on float residuals)."""
    cfg, width = dictionary.cfg, dictionary.width
    rows, cols, values = _selected_codes(dictionary, x)
    fires = torch.bincount(cols, minlength=width)
    i, j, shared = cofiring_pairs(rows, cols, width)
    ratio = (shared / torch.maximum(fires[i], fires[j]).clamp_min(1)) * (shared >= RESAMPLE_MIN_SHARED)
    order = torch.argsort(ratio, descending=True, stable=True)
    order = order[ratio[order] > cfg.cofire_ratio]
    taken: set[int] = set()  # host-side: a handful of pairs and their counts, read back once
    for keep, free, fires_keep, fires_free in zip(i[order].tolist(), j[order].tolist(),
                                                  fires[i[order]].tolist(), fires[j[order]].tolist()):
        if keep in taken or free in taken:
            continue
        if fires_free > fires_keep:
            keep, free = free, keep
        both = torch.zeros(x.shape[0], 2, dtype=values.dtype, device=x.device)
        for slot, latent in enumerate((keep, free)):
            both[rows[cols == latent], slot] = values[cols == latent]
        both = both[(both > 0).all(dim=1)].mean(dim=0)
        for param in (dictionary.W_dec, dictionary.W_enc.T):  # rows are latents in both views
            merged_row = both[0] * param[keep] + both[1] * param[free]
            param[keep] = merged_row * (param[keep].norm() / merged_row.norm().clamp_min(1e-12))
        dictionary.tokens_since_fired[free] = cfg.dead_tokens
        taken |= {keep, free}
    dead = dictionary.dead_mask()
    restart = torch.nonzero(dead).flatten()
    if restart.numel():
        live = ~dead
        rows, cols, values = _selected_codes(dictionary, x)  # after the merges, without the latents restarting
        prediction = torch.zeros(x.shape[0], dictionary.d_out, device=x.device).index_add_(
            0, rows, (values * live[cols]).float()[:, None] * dictionary.W_dec[cols].float())
        residual = dictionary.scaled_target(x, y).float() - prediction - dictionary.b_dec.float()
        weight = residual.pow(2).sum(dim=1).double().cpu()
        weight = weight if weight.sum() > 0 else torch.ones_like(weight)
        picked = torch.multinomial(weight, restart.numel(), replacement=restart.numel() > x.shape[0],
                                   generator=generator).to(x.device)
        decoder = torch.nn.functional.normalize(residual[picked], dim=1)
        encoder = (torch.nn.functional.normalize(dictionary.centered_input(x)[picked].float(), dim=1)
                   if cfg.transcoder else decoder)
        scale = RESAMPLE_ENCODER_SCALE * dictionary.W_enc[:, live].norm(dim=0).mean() if live.any() else 1.0
        decoder_norm = dictionary.W_dec[live].norm(dim=1).mean() if cfg.transcoder and live.any() else 1.0
        dictionary.W_dec[restart] = (decoder * decoder_norm).to(dictionary.W_dec.dtype)
        dictionary.W_enc[:, restart] = (encoder * scale).T.to(dictionary.W_enc.dtype)
        dictionary.b_enc[restart] = 0
        dictionary.tokens_since_fired[restart] = 0
        if cfg.reorder_latents:  # a restarted latent has contributed nothing yet
            dictionary.contribution[restart] = 0
    touched = torch.cat([torch.tensor(sorted(taken), dtype=torch.long, device=restart.device), restart]).unique()
    for tensor, dim in _latent_tensors(dictionary, optimizer):
        if not isinstance(tensor, nn.Parameter):  # an Adam moment: it starts afresh
            tensor.index_fill_(dim, touched.to(tensor.device), 0)
    return len(taken) // 2, int(restart.numel())


# --- target-L0 control (ReLU, JumpReLU) ----------------------------------------------------------
# With an L1, log or L0 penalty the L0 is whatever λ gives, and that drifts as training goes; a sweep
# that must compare dictionaries at equal L0 wants λ set by the L0 instead. After every step
#
#     λ ← λ · exp(rate · (L0 − target) / max(L0, target))
#
# raises λ while the batch fires too many latents and lowers it while it fires too few: a
# multiplicative (log-space) integral controller, so λ stays positive, and its error term is
# bounded in (−1, 1) both ways, so a far-off start cannot overshoot into an all-dead dictionary.
# λ lives in a buffer, so checkpoints carry it and a resumed run continues exactly.

@torch.no_grad()
def adjust_penalty(dictionary: nn.Module, l0: Tensor | float, target: float, rate: float) -> None:
    """One controller step from this batch's L0 (under DDP: the mean over ranks)."""
    coefficient = dictionary.penalty_coefficient
    l0 = torch.as_tensor(l0, dtype=coefficient.dtype, device=coefficient.device)
    coefficient.mul_(torch.exp(rate * (l0 - target) / l0.clamp_min(target)))
