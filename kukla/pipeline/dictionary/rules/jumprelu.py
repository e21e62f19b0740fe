"""JumpReLU (Rajamanoharan et al. 2024, the Gemma Scope recipe): a learned threshold per latent.

    z = pre · H(pre − θ),   θ = exp(log_threshold),   loss += λ · Σᵢ tailᵢ · H(preᵢ − θᵢ)

H has no useful derivative, so θ learns through straight-through pseudo-derivatives with a
rectangle kernel K(u) = 1[|u| < ½] of bandwidth ε (on the normalised scale of pre):

    ∂z/∂pre = H(pre − θ),   ∂z/∂θ = −(θ/ε)·K((pre − θ)/ε),
    ∂H/∂pre = 0,            ∂H/∂θ = −(1/ε)·K((pre − θ)/ε).

The penalty is the L0 (weighted per latent by the prefix scheme's tail mass, as ReLU's L1 is),
so λ trades FVU against latents per token directly; `target_l0` can steer it. At inference the
codes are the same JumpReLU, which SAELens loads as `jumprelu`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from kukla.pipeline.dictionary.rules import PenalisedRule

if TYPE_CHECKING:
    from kukla.pipeline.dictionary.config import DictionaryConfig
    from kukla.pipeline.dictionary.model import Dictionary


def jumprelu_codes(pre: Tensor, threshold: Tensor) -> Tensor:
    """relu(pre) where pre > threshold, else 0 (SAELens' JumpReLU)."""
    return pre.relu() * (pre > threshold).to(pre.dtype)


def _window(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """K((pre − θ)/ε) / ε: the rectangle kernel's pseudo-derivative density."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    """z = pre·H(pre − θ); ∂z/∂pre = H, ∂z/∂θ = −θ·K/ε (summed over rows)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        grad_threshold = -(threshold * (grad * _window(pre, threshold, ctx.bandwidth)).sum(0))
        return grad_pre, grad_threshold.to(threshold.dtype), None


class _Step(torch.autograd.Function):
    """H(pre − θ); ∂H/∂pre = 0, ∂H/∂θ = −K/ε (summed over rows)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        grad_threshold = -(grad * _window(pre, threshold, ctx.bandwidth)).sum(0)
        return None, grad_threshold.to(threshold.dtype), None


def jumprelu_train(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Training codes pre·H(pre − θ) with the straight-through gradient for θ."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """H(pre − θ) with the straight-through gradient for θ (the L0 penalty's)."""
    return _Step.apply(pre, threshold, bandwidth)


class JumpReLU(PenalisedRule):
    name = "jumprelu"
    penalty_metric = "l0_penalty"
    saelens = ("jumprelu", "jumprelu_transcoder")
    loads_from = saelens

    def add_state(self, dictionary: Dictionary) -> None:
        init = math.log(dictionary.cfg.threshold_init)
        dictionary.log_threshold = nn.Parameter(torch.full((dictionary.width,), init))

    def codes(self, dictionary: Dictionary, pre: Tensor) -> Tensor:
        return jumprelu_train(pre, dictionary.log_threshold.exp(), dictionary.cfg.bandwidth)

    def penalty(self, dictionary: Dictionary, pre: Tensor, z: Tensor, tail: Tensor, sigma: Tensor) -> Tensor:
        active = step(pre, dictionary.log_threshold.exp(), dictionary.cfg.bandwidth)
        return (active * tail.to(device=active.device, dtype=active.dtype)).sum(dim=1).mean()

    def penalty_weight(self, cfg: DictionaryConfig) -> float:
        return cfg.l0_coefficient

    def encode(self, dictionary: Dictionary, pre: Tensor) -> Tensor:
        return jumprelu_codes(pre, self.threshold(dictionary))

    def threshold(self, dictionary: Dictionary) -> Tensor:
        return dictionary.log_threshold.exp()

    def load_threshold(self, dictionary: Dictionary, threshold: Tensor) -> None:
        tiny = torch.finfo(torch.float32).tiny  # a threshold of 0 (plain ReLU latents) has no log
        dictionary.log_threshold.copy_(threshold.float().clamp_min(tiny).log().expand(dictionary.width))
