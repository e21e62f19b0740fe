"""BatchTopK: the k·B largest pre-activations of the whole batch; at inference, JumpReLU.

Training selects entries as (rows, cols), row-major with ascending columns, so the sparse path
can gather and scatter there; the values are relu(pre) at those entries. After training a
threshold is calibrated on held-out rows (`calibrate.py`), so inference needs no batch: codes
are JumpReLU at that threshold, capped at `l0_cap` per token, and SAELens loads it as JumpReLU.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kukla.errors import KuklaError
from kukla.pipeline.dictionary.global_batch import ONE_PROCESS, GlobalBatch
from kukla.pipeline.dictionary.rules.jumprelu import jumprelu_codes
from kukla.pipeline.dictionary.rules.rule import Rule
from kukla.pipeline.dictionary.rules.topk import topk_codes

if TYPE_CHECKING:
    from kukla.pipeline.dictionary.config import DictionaryConfig
    from kukla.pipeline.dictionary.model import Dictionary

_SAMPLE = 1 << 16  # entries sampled to estimate BatchTopK's cutoff


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
            over = (codes > 0).sum(1) > cap
            if over.any():
                codes[over] = topk_codes(codes[over], cap)
        return codes

    def threshold(self, dictionary: Dictionary) -> Tensor | None:
        return dictionary.threshold

    def load_threshold(self, dictionary: Dictionary, threshold: Tensor) -> None:
        dictionary.threshold.copy_(threshold.float().expand(dictionary.width))
