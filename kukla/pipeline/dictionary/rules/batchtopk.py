"""BatchTopK: the k·B largest pre-activations of the whole batch; at inference, JumpReLU, calibrated.

Training selects entries as (rows, cols), row-major with ascending columns, so the sparse path
can gather and scatter there; the values are relu(pre) at those entries. After training a
threshold is calibrated on held-out rows (`calibrate_threshold`), so inference needs no batch:
codes are JumpReLU at that threshold, capped at `l0_cap` per token, and SAELens loads it as JumpReLU.

Calibration: the anchors track an EMA of the smallest selected activation during training, which
drifts (SAELens' saved SAE fired 136 latents per token instead of 16). Here the threshold is the
value that keeps exactly k·N of the N calibration tokens' pre-activations: the (k·N)-th largest.
Optionally each latent gets its own threshold (it fires as often as BatchTopK selected it on
the same rows), and a per-token cap keeps the l0_cap largest codes of a token: one threshold
for every token fires >1,000 latents on a massive-activation token (Gemma: ~9× the median norm).

Rows that tune anything must not be scored: the store's held-out tail is split once, the
same way for every store, old or new (`calibration_rows`, then `evaluation_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from kukla.errors import KuklaError
from kukla.pipeline.dictionary.loss import ONE_PROCESS, GlobalBatch
from kukla.pipeline.dictionary.rules.jumprelu import jumprelu_codes
from kukla.pipeline.dictionary.rules import Rule
from kukla.pipeline.dictionary.rules.topk import topk_codes

if TYPE_CHECKING:
    from kukla.pipeline.dictionary.config import DictionaryConfig
    from kukla.pipeline.dictionary.model import Dictionary

_SAMPLE = 1 << 16  # entries sampled to estimate BatchTopK's cutoff
# Each batch keeps its `_SLACK`·k·B largest positive pre-activations as candidates. The
# answer is exact unless some batch has more than that above the final threshold (checked).
_SLACK = 4
CALIBRATION_ROWS_MAX = 1 << 18
"""The calibration split: the first half of the held-out rows, at most 2¹⁸ (262,144) of them."""


def batch_topk_count(k: float, n_rows: int) -> int:
    """How many entries BatchTopK keeps for a batch: round(k·B), the per-token average k."""
    return max(1, int(round(k * n_rows)))


def select_batch_topk(pre: Tensor, k: float, batch: GlobalBatch = ONE_PROCESS) -> tuple[Tensor, Tensor]:
    """The round(k·B) largest pre-activations of the whole (global) batch (BatchTopK).

    Selected once over the whole dictionary: every Matryoshka prefix reuses this set, so a
    prefix's codes are exactly the full codes restricted to its latents. Non-positive entries
    may be among them (a batch with fewer positives than k·B): they are zero after relu, so
    they are inactive and take no gradient. Under data parallelism each share passes its own
    top k·B to the others, so the cutoff is the global batch's exactly, at one gather per step.
    """
    flat = pre.reshape(-1)
    n = batch_topk_count(k, pre.shape[0] * batch.world)
    idx = _largest(flat, min(n, flat.numel()), pre.shape[1])
    if batch.world > 1:
        values = flat[idx]
        cutoff = batch.gather(values).topk(n, sorted=False).values.min()
        idx = idx[values >= cutoff]
    idx = idx.sort().values
    return idx // pre.shape[1], idx % pre.shape[1]


def _largest(flat: Tensor, n: int, width: int) -> Tensor:
    """Indices of the n largest entries, exactly; a full top-k over B·F entries is slow on CPU.

    On CPU a strided sample estimates a cutoff that about 2n entries pass; the top n of those
    are the top n overall whenever at least n pass (else fall back to the full top-k). A GPU's
    top-k is fast and the sample's size checks would stall the host, so it takes the top-k.
    """
    stride = flat.numel() // _SAMPLE
    if flat.is_cuda or stride < 8 or 4 * n > flat.numel():
        return flat.topk(n, sorted=False).indices
    while math.gcd(stride, width) != 1:  # so the sample visits every latent, not a few columns
        stride += 1
    sample = flat[::stride]
    keep = min(sample.numel(), 2 * n // stride + 16)
    cutoff = sample.topk(keep, sorted=False).values.min()
    candidates = (flat >= cutoff).nonzero().squeeze(1)
    if candidates.numel() < n:
        return flat.topk(n, sorted=False).indices
    return candidates[flat[candidates].topk(n, sorted=False).indices]


class BatchTopK(Rule):
    name = "batchtopk"
    calibrated = True
    saelens = ("jumprelu", "jumprelu_transcoder")
    loads_from = ("batchtopk",)

    def select(self, pre: Tensor, cfg: DictionaryConfig, batch: GlobalBatch = ONE_PROCESS) -> tuple[Tensor, Tensor]:
        return select_batch_topk(pre, float(cfg.k or 0), batch)

    def encode(self, dictionary: Dictionary, pre: Tensor) -> Tensor:
        """JumpReLU at the calibrated threshold(s), keeping at most `l0_cap` codes per token when set."""
        if not dictionary.calibrated:
            raise KuklaError("this BatchTopK dictionary has no inference threshold yet: "
                             "run calibrate_threshold on held-out rows first")
        codes = jumprelu_codes(pre, dictionary.threshold)
        cap = int(dictionary.l0_cap)
        if cap:
            over = (codes > 0).sum(-1) > cap  # per token: the model splices [batch, pos, d]
            if over.any():
                codes[over] = topk_codes(codes[over], cap)
        return codes

    def threshold(self, dictionary: Dictionary) -> Tensor | None:
        return dictionary.threshold

    def load_threshold(self, dictionary: Dictionary, threshold: Tensor) -> None:
        dictionary.threshold.copy_(threshold.float().expand(dictionary.width))


class _Rows(Protocol):
    n_rows: int
    holdout_rows: int


def calibration_rows(store: _Rows) -> range:
    """Held-out rows that tune a dictionary (its inference threshold); evaluation never scores them."""
    start = store.n_rows - store.holdout_rows
    return range(start, start + min(store.holdout_rows // 2, CALIBRATION_ROWS_MAX))


def evaluation_rows(store: _Rows) -> range:
    """Held-out rows that evaluation scores: every held-out row after the calibration split."""
    return range(calibration_rows(store).stop, store.n_rows)


@torch.no_grad()
def calibrate_threshold(dictionary: Dictionary, batches: Iterable[Tensor | tuple[Tensor, ...]], *,
                        per_latent: bool = False, l0_cap: int = 0) -> float:
    """Set the inference rule so it keeps k latents per token on these rows; return the L0 it gives.

    `batches` yields raw input activations (or tuples whose first item is the input, as the
    store's stream does for transcoders), batched as in training: BatchTopK's per-latent
    selection counts depend on the batch. `per_latent`: one threshold per latent, matching how
    often BatchTopK selected it; else one threshold for all. `l0_cap` (0: none) then caps each
    token's L0. The measured L0 (cap included) is stored in `dictionary.inference_l0`.
    """
    cfg = dictionary.cfg
    if not dictionary.rule.calibrated:
        raise KuklaError(f"only BatchTopK dictionaries have a calibrated inference threshold (this one is {cfg.activation})")
    width = dictionary.width
    values, latents, rows = [], [], []
    selected = torch.zeros(width, dtype=torch.long)
    saturated_floor = 0.0  # all candidates above the largest floor of a batch that kept all it could
    n_tokens = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        flat = dictionary.pre_activations(x).float().reshape(-1)
        keep = min(flat.numel(), int(_SLACK * cfg.k * x.shape[0]) + 1)
        top = flat.topk(keep)  # sorted: the first round(k·B) positive ones are BatchTopK's selection
        positive = top.values > 0
        if keep < flat.numel() and positive.all():
            saturated_floor = max(saturated_floor, float(top.values[-1]))
        value, index = top.values[positive].cpu(), top.indices[positive].cpu()
        selected += torch.bincount(index[:batch_topk_count(cfg.k, x.shape[0])] % width, minlength=width)
        values.append(value)
        latents.append(index % width)
        rows.append(index // width + n_tokens)
        n_tokens += x.shape[0]
    if n_tokens == 0:
        raise KuklaError("calibrate_threshold got no rows: pass held-out activation batches")
    value, latent, row = torch.cat(values), torch.cat(latents), torch.cat(rows)
    threshold = (_per_latent_thresholds(value, latent, selected, saturated_floor) if per_latent
                 else torch.full((width,), _global_threshold(value, round(float(cfg.k) * n_tokens))))
    if float(threshold.min()) < saturated_floor:
        raise KuklaError("threshold calibration saw a batch with far more active latents than k·B: "
                         "calibrate on larger, shuffled batches")
    l0_per_row = torch.bincount(row[value > threshold[latent]], minlength=n_tokens)
    if l0_cap:
        l0_per_row = l0_per_row.clamp(max=l0_cap)
    l0 = float(l0_per_row.sum()) / n_tokens
    dictionary.threshold.copy_(threshold)
    dictionary.l0_cap.fill_(l0_cap)
    dictionary.inference_l0.fill_(l0)
    return l0


def _global_threshold(values: Tensor, n_keep: int) -> float:
    """The (n_keep+1)-th largest value (inference fires at pre > t), or 0 if fewer are positive."""
    if values.numel() <= n_keep:
        return 0.0
    return float(values.topk(n_keep + 1).values[-1])


def _per_latent_thresholds(values: Tensor, latents: Tensor, selected: Tensor, floor: float) -> Tensor:
    """For latent i selected c_i times: its (c_i+1)-th largest candidate value, so it fires c_i times
    (a latent with no further candidate takes the floor below which candidates are incomplete)."""
    width = selected.numel()
    order = values.argsort(descending=True)
    order = order[latents[order].argsort(stable=True)]  # grouped by latent, each group descending
    size = torch.bincount(latents, minlength=width)
    start = torch.cumsum(size, 0) - size
    threshold = torch.full((width,), floor)
    has = selected < size
    threshold[has] = values[order][start[has] + selected[has]].clamp(min=floor)
    return threshold
