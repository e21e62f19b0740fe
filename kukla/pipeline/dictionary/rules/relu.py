"""ReLU: codes relu(pre) everywhere, made sparse by a penalty (L1 or log, Nabeshima), per prefix.

Each latent costs a = zᵢ‖W_dec,i‖ / σ (σ the target's RMS deviation norm, so the penalty does
not depend on the activations' scale): l1 = a, or log = log(1 + a/ε), Nabeshima's
log(a + ε) less its constant log ε so that a silent latent costs nothing (same gradient).
Summed per prefix, Σ_p w_p Σ_{i<p} cost_i = Σ_i (1 − C(i))·cost_i: a latent is charged the
weight of every prefix it belongs to, so early latents pay most.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from torch import Tensor

from kukla.pipeline.dictionary.rules import PenalisedRule

if TYPE_CHECKING:
    from kukla.pipeline.dictionary.config import DictionaryConfig
    from kukla.pipeline.dictionary.model import Dictionary


def sparsity_penalty(z: Tensor, W_dec: Tensor, tail: Tensor, sigma: Tensor,
                     kind: Literal["l1", "log"], epsilon: float) -> Tensor:
    """Mean over rows of Σᵢ tailᵢ · cost(zᵢ‖W_dec,i‖/σ), for dense codes z [B, F]."""
    a = z * (W_dec.norm(dim=1) / sigma)
    cost = a if kind == "l1" else (a / epsilon).log1p()
    return (cost * tail.to(device=cost.device, dtype=cost.dtype)).sum(dim=1).mean()


class ReLU(PenalisedRule):
    name = "relu"
    penalty_metric = "l1"
    saelens = ("standard", "transcoder")
    loads_from = ("standard", "transcoder")

    def codes(self, dictionary: Dictionary, pre: Tensor) -> Tensor:
        return pre.relu()

    def penalty(self, dictionary: Dictionary, pre: Tensor, z: Tensor, tail: Tensor, sigma: Tensor) -> Tensor:
        cfg = dictionary.cfg
        return sparsity_penalty(z, dictionary.W_dec, tail, sigma, cfg.penalty, cfg.log_epsilon)

    def penalty_weight(self, cfg: DictionaryConfig) -> float:
        return cfg.l1_coefficient

    def encode(self, dictionary: Dictionary, pre: Tensor) -> Tensor:
        return pre.relu()
