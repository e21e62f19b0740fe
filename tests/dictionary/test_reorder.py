"""Latent reordering permutes parameters, Adam moments and per-latent buffers together."""

from __future__ import annotations

import copy

import torch

from kukla.pipeline.dictionary import Dictionary, DictionaryConfig, training_loss
from kukla.pipeline.dictionary.model import CONTRIBUTION_DECAY, reorder_latents
from steps import adam_step


def test_a_reordered_dictionary_trains_on_as_the_same_dictionary_permuted():
    """Plain BatchTopK does not depend on latent order, so stepping a reordered copy must give
    the permuted weights of stepping the original: true only if the Adam moments moved with them."""
    torch.manual_seed(0)
    cfg = DictionaryConfig(d_in=8, width=32, k=2.0, arch="batchtopk", reorder_latents=True, dead_tokens=50)
    a = Dictionary(cfg)
    x = [torch.randn(64, 8) for _ in range(4)]
    a.set_scales(float(x[0].norm(dim=1).mean()))
    a.initialize(x[0])
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2)
    for batch in x[:2]:
        adam_step(a, opt_a, batch)
    b = copy.deepcopy(a)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    contribution = torch.rand(32)
    order = reorder_latents(b, opt_b, contribution)
    assert not torch.equal(order, torch.arange(32))
    torch.testing.assert_close(b.contribution, (1 - CONTRIBUTION_DECAY) * contribution[order])
    assert torch.equal(order, torch.argsort(contribution, descending=True))
    for batch in x[2:]:
        out_a, out_b = adam_step(a, opt_a, batch), adam_step(b, opt_b, batch)
        assert torch.equal(out_b.fired, out_a.fired[order])
        torch.testing.assert_close(out_b.loss, out_a.loss)
    torch.testing.assert_close(b.W_enc, a.W_enc[:, order])
    torch.testing.assert_close(b.W_dec, a.W_dec[order])
    torch.testing.assert_close(b.b_enc, a.b_enc[order])
    torch.testing.assert_close(b.b_dec, a.b_dec)
    assert torch.equal(b.tokens_since_fired, a.tokens_since_fired[order])
    torch.testing.assert_close(opt_b.state[b.W_enc]["exp_avg_sq"], opt_a.state[a.W_enc]["exp_avg_sq"][:, order])


def test_the_batch_contribution_is_the_mean_squared_code_times_decoder_norm():
    torch.manual_seed(1)
    d = Dictionary(DictionaryConfig(d_in=6, width=16, k=None, arch="relu", reorder_latents=True))
    x = torch.randn(20, 6)
    d.set_scales(float(x.norm(dim=1).mean()))
    with torch.no_grad():
        d.W_dec.mul_(torch.rand(16, 1) + 0.5)
    out = training_loss(d, x)
    z = d.pre_activations(x).relu().detach()
    torch.testing.assert_close(out.contribution, (z ** 2).mean(0) * d.W_dec.detach().norm(dim=1) ** 2)
