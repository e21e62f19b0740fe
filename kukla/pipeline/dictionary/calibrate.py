"""Inference threshold for BatchTopK, calibrated on held-out rows so that inference L0 ≈ k.

The anchors track an EMA of the smallest selected activation during training, which drifts
(SAELens' saved SAE fired 136 latents per token instead of 16). Here the threshold is the
value that keeps exactly k·N of the N held-out tokens' pre-activations: the (k·N)-th largest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections.abc import Iterable

import torch
from torch import Tensor

from kukla.errors import KuklaError

if TYPE_CHECKING:
    from kukla.pipeline.dictionary.model import Dictionary

# Each batch keeps its `_SLACK`·k·B largest positive pre-activations as candidates. The
# answer is exact unless some batch has more than that above the final threshold (checked).
_SLACK = 4


@torch.no_grad()
def calibrate_threshold(dictionary: Dictionary, batches: Iterable[Tensor | tuple[Tensor, ...]]) -> float:
    """Set `dictionary.threshold` so inference keeps k latents per token on these rows; return that L0.

    `batches` yields raw input activations (or tuples whose first item is the input, as the
    store's stream does for transcoders). The measured L0 is also stored in
    `dictionary.inference_l0` and saved with the dictionary.
    """
    cfg = dictionary.cfg
    if cfg.activation_rule != "batchtopk":
        raise KuklaError(f"only BatchTopK dictionaries have an inference threshold (this one is {cfg.arch})")
    candidates: list[Tensor] = []
    saturated_floor: list[float] = []  # smallest kept value of batches that kept all they could
    n_tokens = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        pre = dictionary.pre_activations(x).float().reshape(-1)
        positive = pre[pre > 0]
        keep = min(positive.numel(), int(_SLACK * cfg.k * x.shape[0]) + 1)
        top = positive.topk(keep, sorted=False).values if keep < positive.numel() else positive
        if keep < positive.numel():
            saturated_floor.append(float(top.min()))
        candidates.append(top.cpu())
        n_tokens += x.shape[0]
    if n_tokens == 0:
        raise KuklaError("calibrate_threshold got no rows: pass held-out activation batches")
    values = torch.cat(candidates)
    n_keep = int(round(float(cfg.k) * n_tokens))
    if values.numel() <= n_keep:  # fewer positive pre-activations than k·N: everything positive fires
        threshold = 0.0
    else:
        # keep the n_keep largest: threshold = the (n_keep+1)-th largest, since inference uses pre > t
        threshold = float(values.topk(n_keep + 1).values[-1])
    if any(floor > threshold for floor in saturated_floor):
        raise KuklaError("threshold calibration saw a batch with far more active latents than k·B: "
                         "calibrate on larger, shuffled batches")
    l0 = float((values > threshold).sum()) / n_tokens
    dictionary.threshold.fill_(threshold)
    dictionary.inference_l0.fill_(l0)
    return l0
