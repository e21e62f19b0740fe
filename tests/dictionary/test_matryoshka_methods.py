"""All-prefix Matryoshka, per-prefix penalties and the snap loss, against naive per-prefix loops."""

from __future__ import annotations

import math

import pytest
import torch

from kukla.errors import ConfigError
from kukla.pipeline.dictionary import Dictionary, DictionaryConfig, training_loss
from kukla.pipeline.dictionary.loss import all_prefix_errors
from kukla.pipeline.dictionary.prefixes import all_prefix_cdf, sample_prefix_lengths

WIDTH = 24


def _dictionary(seed: int = 0, **overrides) -> tuple[Dictionary, torch.Tensor, torch.Tensor | None]:
    torch.manual_seed(seed)
    settings = dict(d_in=10, width=WIDTH, k=3.0, arch="matryoshka-prefix", prefixes="all", n_prefixes=5)
    if "arch" in overrides and "prefixes" not in overrides:
        del settings["prefixes"]  # the arch shorthand sets it
    settings.update(overrides)
    transcoder = settings.get("transcoder", False)
    d = Dictionary(DictionaryConfig(**settings, d_out=7 if transcoder else None))
    x = torch.randn(30, 10) * 2 + 0.5
    y = torch.randn(30, 7) + 0.3 if transcoder else None
    d.set_scales(float(x.norm(dim=1).mean()), float(y.norm(dim=1).mean()) if transcoder else None)
    d.initialize(x, y)
    with torch.no_grad():  # break W_enc = W_decᵀ and a transcoder's zero decoder so every term has a gradient
        d.W_enc.add_(0.2 * torch.randn_like(d.W_enc))
        d.W_dec.add_(0.2 * torch.randn_like(d.W_dec))
        d.b_enc.add_(0.1 * torch.randn_like(d.b_enc))
    return d, x, y


def _naive_codes(d: Dictionary, pre: torch.Tensor) -> torch.Tensor:
    """Dense codes by full sorts: TopK per row, BatchTopK over the batch, or ReLU."""
    rule, acts = d.cfg.activation, pre.relu()
    if rule == "relu":
        return acts
    if rule == "topk":
        cutoff = acts.sort(dim=1, descending=True).values[:, int(d.cfg.k) - 1:int(d.cfg.k)]
        return acts * (acts >= cutoff)
    cutoff = acts.flatten().sort(descending=True).values[round(float(d.cfg.k) * pre.shape[0]) - 1]
    return acts * (acts >= cutoff)


def _naive_loss(d: Dictionary, x: torch.Tensor, y: torch.Tensor | None, prefixes: list[int],
                weights: list[float], l2: bool = False) -> torch.Tensor:
    """Σ_p w_p · (error of prefix p + its own sparsity penalty), one full decode per prefix."""
    x_s = x * d.input_scale
    pre = (x_s if d.cfg.transcoder else x_s - d.b_dec) @ d.W_enc + d.b_enc
    z = _naive_codes(d, pre)
    target = y * d.target_scale if d.cfg.transcoder else x_s
    dev = ((target - target.mean(0)) ** 2).sum(1)
    sigma = (dev.sum() / x.shape[0]).sqrt()
    loss = torch.zeros(())
    for p, w in zip(prefixes, weights):
        err = ((target - z[:, :p] @ d.W_dec[:p] - d.b_dec) ** 2).sum(1)
        term = err.sqrt().sum() / dev.sqrt().sum() if l2 else err.sum() / dev.sum()
        if d.cfg.activation == "relu":
            a = z[:, :p] * d.W_dec[:p].norm(dim=1) / sigma
            cost = a if d.cfg.penalty == "l1" else torch.log(a + d.cfg.log_epsilon) - math.log(d.cfg.log_epsilon)
            term = term + d.cfg.l1_coefficient * cost.sum(1).mean()
        loss = loss + w * term
    return loss


def _all_weights(width: int, n: int) -> list[float]:
    """w_p written out: n/(n+1)·(√p − √(p−1))/√F, plus 1/(n+1) at p = F."""
    w = [n / (n + 1) * (math.sqrt(p) - math.sqrt(p - 1)) / math.sqrt(width) for p in range(1, width + 1)]
    w[-1] += 1 / (n + 1)
    return w


def _grads(d: Dictionary, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [d.W_enc, d.b_enc, d.W_dec, d.b_dec]))


def _assert_matches(d, x, y, ours, naive):
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec"], _grads(d, ours), _grads(d, naive)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("activation,sparse_path,transcoder", [
    ("batchtopk", True, False), ("batchtopk", False, False), ("topk", True, False), ("batchtopk", True, True),
    ("relu", True, False)])
@pytest.mark.parametrize("l2", [False, True])
def test_all_prefix_loss_and_gradients_equal_a_loop_over_every_prefix(activation, sparse_path, transcoder, l2):
    d, x, y = _dictionary(activation=activation, sparse_path=sparse_path, transcoder=transcoder,
                          k=None if activation == "relu" else 3.0)
    out = training_loss(d, x, y, l2=l2)
    naive = _naive_loss(d, x, y, list(range(1, WIDTH + 1)), _all_weights(WIDTH, 5), l2)
    _assert_matches(d, x, y, out.loss, naive)


@pytest.mark.parametrize("l2", [False, True])
def test_all_prefix_errors_of_uneven_and_empty_rows_equal_a_loop_over_every_prefix(l2):
    """Rows with 0, 1 and many active latents (BatchTopK's extremes), against a dense decode per prefix."""
    torch.manual_seed(3)
    width, dim = 12, 5
    W_dec = torch.randn(width, dim, requires_grad=True)
    e = torch.randn(4, dim, requires_grad=True)
    active = [[], [7], list(range(width)), [0, 3, 11]]
    rows = torch.tensor([b for b, cols in enumerate(active) for _ in cols])
    cols = torch.tensor([c for cols in active for c in cols])
    values = torch.rand(len(cols), requires_grad=True)
    cdf = all_prefix_cdf(width, 4)
    ours, residual = all_prefix_errors(rows, cols, values, W_dec, e, cdf, l2)
    z = torch.zeros(4, width).index_put((rows, cols), values)
    naive = sum(w * ((e - z[:, :p] @ W_dec[:p]) ** 2).sum(1).pow(0.5 if l2 else 1).sum()
                for p, w in zip(range(1, width + 1), cdf.diff().float()))
    torch.testing.assert_close(ours, naive)
    torch.testing.assert_close(residual, (e - z @ W_dec).detach())
    for a, b in zip(torch.autograd.grad(ours, [W_dec, e, values]), torch.autograd.grad(naive, [W_dec, e, values])):
        torch.testing.assert_close(a, b)


def test_all_prefix_with_the_log_penalty_charges_each_latent_its_tail_mass():
    d, x, y = _dictionary(activation="relu", k=None, penalty="log", log_epsilon=0.05, l1_coefficient=0.2)
    out = training_loss(d, x)
    _assert_matches(d, x, y, out.loss, _naive_loss(d, x, y, list(range(1, WIDTH + 1)), _all_weights(WIDTH, 5)))


@pytest.mark.parametrize("penalty", ["l1", "log"])
def test_sampled_prefixes_sum_the_penalty_per_prefix(penalty):
    d, x, y = _dictionary(activation="relu", k=None, prefixes="sampled", n_prefixes=4, penalty=penalty)
    out = training_loss(d, x, generator=torch.Generator().manual_seed(2))
    draws = sample_prefix_lengths(WIDTH, 4, torch.Generator().manual_seed(2)).tolist()
    _assert_matches(d, x, y, out.loss, _naive_loss(d, x, y, draws, [1 / 5] * 5))


@pytest.mark.parametrize("overrides", [dict(arch="batchtopk"),
                                       dict(arch="matryoshka-batchtopk", levels=[4, 12, 24]),
                                       dict(prefixes="sampled", n_prefixes=3)])
def test_snap_loss_uses_the_unsquared_error_for_every_prefix_scheme(overrides):
    d, x, y = _dictionary(**overrides)
    out = training_loss(d, x, generator=torch.Generator().manual_seed(4), l2=True)
    prefixes, weights = {"none": ([WIDTH], [1.0]), "levels": ([4, 12, 24], [1 / 3] * 3),
                         "sampled": (sample_prefix_lengths(WIDTH, 3, torch.Generator().manual_seed(4)).tolist(), [1 / 4] * 4)
                         }[d.cfg.prefixes]
    _assert_matches(d, x, y, out.loss, _naive_loss(d, x, y, prefixes, weights, l2=True))
    assert float(training_loss(d, x, generator=torch.Generator().manual_seed(4)).loss) != pytest.approx(float(out.loss))


def test_all_prefix_loss_is_the_expectation_of_the_sampled_loss_with_replacement():
    """Averaged over many with-replacement draws of n lengths (plus F), the sampled loss converges
    to the all-prefix loss; the per-prefix losses come from a naive loop."""
    d, x, y = _dictionary(n_prefixes=3)
    with torch.no_grad():
        per_prefix = torch.stack([_naive_loss(d, x, y, [p], [1.0]) for p in range(1, WIDTH + 1)])
        exact = float(training_loss(d, x).loss)
        probs = torch.tensor([math.sqrt(p) - math.sqrt(p - 1) for p in range(1, WIDTH + 1)]) / math.sqrt(WIDTH)
        draws = torch.multinomial(probs, 3 * 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
        sampled = (per_prefix[draws].reshape(20_000, 3).sum(1) + per_prefix[-1]) / 4
    assert float(sampled.mean()) == pytest.approx(exact, rel=3 * float(sampled.std()) / math.sqrt(20_000) / exact)
    assert all_prefix_cdf(WIDTH, 3)[-1] == 1.0 and all_prefix_cdf(WIDTH, 3)[0] == 0.0


def test_matryoshka_method_settings_are_validated():
    with pytest.raises(ConfigError, match="prefixes"):
        DictionaryConfig(d_in=8, width=32, k=2, arch="batchtopk", prefixes="all")
    with pytest.raises(ConfigError, match="n_prefixes"):
        DictionaryConfig(d_in=8, width=8, k=2, arch="matryoshka-prefix", n_prefixes=8)
    with pytest.raises(ConfigError, match="snap_fraction"):
        DictionaryConfig(d_in=8, width=32, k=2, snap_fraction=1.5)
    with pytest.raises(ConfigError, match="log_epsilon"):
        DictionaryConfig(d_in=8, width=32, k=None, arch="relu", penalty="log", log_epsilon=0)
    DictionaryConfig(d_in=8, width=8, k=2, arch="matryoshka-prefix", prefixes="all", n_prefixes=9)


@pytest.mark.parametrize("activation,sparse_path", [("batchtopk", True), ("batchtopk", False), ("relu", True)])
def test_spread_levels_weight_every_length_of_a_level_equally_in_loss_and_gradients(activation, sparse_path):
    """Levels 4/12/24 with weights 0.5/0.3/0.2 spread: each length l of level j weighs w_j/(p_j − p_{j−1})."""
    arch = "relu" if activation == "relu" else "matryoshka-batchtopk"
    d, x, y = _dictionary(arch=arch, levels=[4, 12, WIDTH], level_weights=[0.5, 0.3, 0.2],
                          spread_levels=True, sparse_path=sparse_path, k=None if activation == "relu" else 3.0)
    weights = [0.5 / 4] * 4 + [0.3 / 8] * 8 + [0.2 / 12] * 12
    out = training_loss(d, x, y)
    _assert_matches(d, x, y, out.loss, _naive_loss(d, x, y, list(range(1, WIDTH + 1)), weights))


def test_spread_levels_apply_to_fixed_levels_only():
    with pytest.raises(ConfigError, match="spread_levels"):
        DictionaryConfig(d_in=8, width=32, k=2, arch="batchtopk", spread_levels=True)
    with pytest.raises(ConfigError, match="spread_levels"):
        DictionaryConfig(d_in=8, width=32, k=2, arch="matryoshka-prefix", spread_levels=True)
    DictionaryConfig(d_in=8, width=32, k=2, arch="matryoshka-batchtopk", spread_levels=True)
