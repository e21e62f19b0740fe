"""Dictionary: initialisation, decoder constraint, dead-latent counting, inference rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from kukla.errors import KuklaError
from kukla.pipeline.dictionary import Dictionary, DictionaryConfig, training_loss
from kukla.pipeline.dictionary.model import geometric_median


def test_geometric_median_matches_an_independent_solver():
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    points[:10] += 40.0  # outliers pull the mean, barely the median
    ours = geometric_median(points).numpy()
    pts = points.numpy()
    objective = lambda m: np.linalg.norm(pts - m, axis=1).sum()  # noqa: E731
    theirs = minimize(objective, pts.mean(0), method="Nelder-Mead",
                      options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000, "maxfev": 40000}).x
    assert np.allclose(ours, theirs, atol=1e-4)
    assert objective(ours) <= objective(theirs) + 1e-8
    assert np.linalg.norm(ours) < 0.5 * np.linalg.norm(pts.mean(0))


def test_sae_starts_with_unit_decoder_rows_tied_encoder_and_median_bias():
    d = Dictionary(DictionaryConfig(d_in=8, width=32, k=2, arch="batchtopk"))
    x = torch.randn(200, 8) * 3 + 1
    d.set_scales(float(x.norm(dim=1).mean()))
    d.initialize(x)
    torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(d.W_enc, d.W_dec.t())
    torch.testing.assert_close(d.b_dec, geometric_median(x * d.input_scale))
    assert float((x * d.input_scale).norm(dim=1).mean()) == pytest.approx(8 ** 0.5, rel=1e-5)


def test_transcoder_decoder_starts_at_zero_and_is_not_norm_constrained():
    d = Dictionary(DictionaryConfig(d_in=8, d_out=6, width=32, k=2, arch="batchtopk", transcoder=True))
    x, y = torch.randn(100, 8), torch.randn(100, 6) * 5
    d.set_scales(float(x.norm(dim=1).mean()), float(y.norm(dim=1).mean()))
    d.initialize(x, y)
    assert torch.count_nonzero(d.W_dec) == 0
    assert float(d.target_scale) != float(d.input_scale)
    with torch.no_grad():
        d.W_dec.fill_(0.5)
    d.normalize_decoder()
    assert torch.all(d.W_dec == 0.5)
    with pytest.raises(KuklaError, match="target"):
        training_loss(d, x)


def test_projected_decoder_gradient_keeps_rows_unit_norm_to_first_order():
    torch.manual_seed(0)
    d = Dictionary(DictionaryConfig(d_in=8, width=32, k=2, arch="topk"))
    x = torch.randn(64, 8)
    d.initialize(x)
    training_loss(d, x).loss.backward()
    raw = d.W_dec.grad.clone()
    d.project_decoder_grads()
    assert (d.W_dec.grad * d.W_dec).sum(1).abs().max() < 1e-6
    assert (raw * d.W_dec).sum(1).abs().max() > 1e-4  # the raw gradient did have a radial part
    lr = 1e-3
    with torch.no_grad():
        projected_step = (d.W_dec - lr * d.W_dec.grad).norm(dim=1)
        raw_step = (d.W_dec - lr * raw).norm(dim=1)
    assert (projected_step - 1).abs().max() < 10 * lr**2 * d.W_dec.grad.norm(dim=1).max() ** 2 + 1e-7
    assert (raw_step - 1).abs().max() > (projected_step - 1).abs().max()


def test_dead_counter_counts_tokens_not_steps():
    d = Dictionary(DictionaryConfig(d_in=8, width=6, k=2, arch="batchtopk", dead_tokens=1000))
    fired = torch.tensor([True, False, False, False, False, False])
    d.update_dead(fired, 600)
    d.update_dead(torch.tensor([False, True, False, False, False, False]), 300)
    assert d.tokens_since_fired.tolist() == [300, 0, 900, 900, 900, 900]
    assert not d.dead_mask().any()
    d.update_dead(torch.zeros(6, dtype=torch.bool), 100)  # one more step of 100 tokens crosses 1000
    assert d.dead_mask().tolist() == [False, False, True, True, True, True]


def test_training_reports_which_latents_fired():
    torch.manual_seed(0)
    d = Dictionary(DictionaryConfig(d_in=8, width=32, k=2, arch="topk"))
    x = torch.randn(16, 8)
    out = training_loss(d, x)
    codes = d.encode(x)
    assert torch.equal(out.fired, (codes > 0).any(0))


def test_inference_rules_topk_per_token_and_uncalibrated_batchtopk_refuses():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    topk = Dictionary(DictionaryConfig(d_in=8, width=32, k=3, arch="topk"))
    assert torch.all((topk.encode(x) > 0).sum(1) <= 3)
    batchtopk = Dictionary(DictionaryConfig(d_in=8, width=32, k=3, arch="batchtopk"))
    with pytest.raises(KuklaError, match="calibrate_threshold"):
        batchtopk.encode(x)
    batchtopk.threshold.fill_(0.5)
    pre = batchtopk.pre_activations(x)
    torch.testing.assert_close(batchtopk.encode(x), pre * (pre > 0.5))
    torch.testing.assert_close(batchtopk(x), batchtopk.encode(x) @ batchtopk.W_dec + batchtopk.b_dec)


def test_measured_path_choice_leaves_weights_gradients_and_rng_as_they_were():
    from kukla.pipeline.train.sweep import choose_sparse_path

    torch.manual_seed(0)
    d = Dictionary(DictionaryConfig(d_in=16, width=128, k=4, arch="matryoshka-batchtopk", levels=[32, 128]))
    x = torch.randn(64, 16)
    before = {k: v.clone() for k, v in d.state_dict().items()}
    rng = torch.get_rng_state()
    assert choose_sparse_path(d, x) is True  # CPU: sparse, unmeasured (benchmarks/RESULTS.md)
    chosen = choose_sparse_path(d, x, measure=True)  # what a GPU does: time both paths
    assert d.use_sparse_path is chosen and isinstance(chosen, bool)
    for name, value in d.state_dict().items():  # (the uncalibrated threshold is NaN)
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert all(p.grad is None for p in d.parameters()) and torch.equal(torch.get_rng_state(), rng)
    dense = Dictionary(DictionaryConfig(d_in=16, width=128, k=4, arch="batchtopk", sparse_path=False))
    assert choose_sparse_path(dense, x, measure=True) is False  # the dense reference was asked for: kept
