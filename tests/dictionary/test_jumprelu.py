"""JumpReLU training: codes, L0 penalty and the straight-through threshold gradients, against a naive
computation of the Gemma Scope definitions written out here."""

from __future__ import annotations

import math

import pytest
import torch

from kukla.errors import ConfigError
from kukla.pipeline.dictionary import Dictionary, DictionaryConfig, training_loss

EPS, LAM = 0.4, 0.05


def _dictionary(**overrides) -> tuple[Dictionary, torch.Tensor]:
    torch.manual_seed(0)
    settings = dict(activation="jumprelu", prefixes="none", bandwidth=EPS, l0_coefficient=LAM, aux_coefficient=0.0)
    cfg = DictionaryConfig(d_in=10, width=24, **{**settings, **overrides})
    d = Dictionary(cfg)
    x = torch.randn(64, 10) * 3 + 0.5
    d.set_scales(float(x.norm(dim=1).mean()))
    d.initialize(x)
    with torch.no_grad():
        d.log_threshold.copy_(torch.empty(24).uniform_(math.log(0.2), math.log(1.0)))
        d.b_enc.normal_(0, 0.3)
    return d, x


def _naive(d: Dictionary, x: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, ∂loss/∂log θ and ∂loss/∂b_enc from the paper's definitions, without kukla's rule."""
    x_s = x * d.input_scale
    b_dec = d.b_dec.detach()
    pre = ((x_s - b_dec) @ d.W_enc.detach() + d.b_enc.detach()).requires_grad_()
    theta = d.log_threshold.detach().exp()
    gate = (pre.detach() > theta).float()
    z = pre * gate  # ∂z/∂pre = H(pre − θ)
    recon = z @ d.W_dec.detach() + b_dec
    fvu = (x_s - recon).pow(2).sum() / (x_s - x_s.mean(0)).pow(2).sum()
    l0 = (gate * tail).sum(1).mean()
    loss = fvu + LAM * l0
    grad_z, = torch.autograd.grad(fvu, z, retain_graph=True)
    grad_pre, = torch.autograd.grad(loss, pre)
    kernel = ((pre.detach() - theta).abs() < EPS / 2).float()  # rectangle K((pre − θ)/ε)
    d_theta = (grad_z * -(theta / EPS) * kernel).sum(0) + LAM * (tail * -(1 / EPS) * kernel).mean(0)
    return loss.detach(), d_theta * theta, grad_pre.sum(0)  # chain rule through θ = exp(log θ)


def test_jumprelu_loss_and_straight_through_gradients_match_the_definition():
    d, x = _dictionary()
    out = training_loss(d, x)
    out.loss.backward()
    loss, grad_log_theta, grad_b_enc = _naive(d, x, torch.ones(24))
    assert float(d.log_threshold.grad.abs().sum()) > 0  # some pre-activations lie in the kernel's window
    torch.testing.assert_close(out.loss.detach(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.log_threshold.grad, grad_log_theta, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d.b_enc.grad, grad_b_enc, rtol=1e-4, atol=1e-6)
    theta = d.log_threshold.detach().exp()
    pre = d.pre_activations(x).detach()
    assert float(out.metrics["l0"]) == pytest.approx(float((pre > theta).sum(1).float().mean()))


def test_jumprelu_penalty_charges_each_latent_the_weight_of_the_levels_that_hold_it():
    d, x = _dictionary(prefixes="levels", levels=[8, 24])
    out = training_loss(d, x)
    tail = torch.tensor([1.0] * 8 + [0.5] * 16)  # in both levels (weights 1/2 each), or only in the full one
    theta = d.log_threshold.detach().exp()
    pre = d.pre_activations(x).detach()
    gate = (pre > theta).float()
    assert float(out.metrics["l0_penalty"]) == pytest.approx(float((gate * tail).sum(1).mean()), rel=1e-6)
    d.rule.penalty(d, pre, gate, tail, torch.ones(())).backward()  # the penalty alone: ∂H/∂θ = −K/ε
    kernel = ((pre - theta).abs() < EPS / 2).float()
    expected = theta * (tail * -(1 / EPS) * kernel).mean(0)
    assert float(expected.abs().sum()) > 0
    torch.testing.assert_close(d.log_threshold.grad, expected, rtol=1e-5, atol=1e-7)


def test_jumprelu_encode_is_the_training_rule_at_the_learned_threshold():
    d, x = _dictionary()
    theta = d.log_threshold.detach().exp()
    pre = d.pre_activations(x).detach()
    torch.testing.assert_close(d.encode(x).detach(), torch.where(pre > theta, pre, torch.zeros_like(pre)))


def test_jumprelu_has_no_k_and_its_settings_are_checked():
    with pytest.raises(ConfigError, match="bandwidth"):
        DictionaryConfig(d_in=8, width=32, activation="jumprelu", bandwidth=0)
    with pytest.raises(ConfigError, match="threshold_init"):
        DictionaryConfig(d_in=8, width=32, activation="jumprelu", threshold_init=-1)
    cfg = DictionaryConfig(d_in=8, width=32, arch="jumprelu", target_l0=5)
    assert (cfg.activation, cfg.prefixes, cfg.k) == ("jumprelu", "none", None)
