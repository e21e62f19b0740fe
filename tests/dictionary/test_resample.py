"""Restarting latents (`resample_at`): a rotated parent+child pair becomes the parent and the child,
dead latents restart at residuals, and both are checked against naive computations."""

from __future__ import annotations

import math

import pytest
import torch

from kukla.errors import ConfigError
from kukla.pipeline.dictionary import Dictionary, DictionaryConfig
from kukla.pipeline.dictionary.model import RESAMPLE_ENCODER_SCALE, cofiring_pairs, resample_latents

D, WIDTH = 8, 6


def _rotated_pair() -> tuple[Dictionary, torch.optim.Adam, torch.Tensor, torch.Tensor]:
    """Parent e0 on three quarters of the rows, its child e1 on a fifth of those, another feature e2
    alone on the rest; latents 0/1 are the rotated pair (e0 ± e1)/√2, latent 2 is e2, latents 3–5
    are dead (negative on every row)."""
    generator = torch.Generator().manual_seed(0)
    n = 400
    parent = torch.rand(n, generator=generator) < 0.75
    child = parent & (torch.rand(n, generator=generator) < 0.2)
    magnitude = 1 + 0.1 * torch.rand(n, 3, generator=generator)
    x = torch.zeros(n, D)
    x[:, 0] = magnitude[:, 0] * parent
    x[:, 1] = magnitude[:, 1] * child
    x[:, 2] = magnitude[:, 2] * ~parent
    d = Dictionary(DictionaryConfig(d_in=D, width=WIDTH, k=2.0, arch="batchtopk", resample_at=[0.5],
                                    dead_tokens=100))
    d.set_scales(math.sqrt(D))  # input_scale 1: rows stay as written
    rows = torch.zeros(WIDTH, D)
    rows[0, :2] = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    rows[1, :2] = torch.tensor([1.0, -1.0]) / math.sqrt(2)
    rows[2, 2] = 1.0
    rows[3:] = -torch.nn.functional.normalize(torch.rand(3, D, generator=generator), dim=1)
    with torch.no_grad():
        d.W_dec.copy_(rows)
        d.W_enc.copy_(rows.T * 0.9)
        d.b_enc.zero_()
        d.b_dec.zero_()
        d.tokens_since_fired[3:] = 1000  # dead
    optimizer = torch.optim.Adam(d.parameters(), lr=1e-3)
    for p in d.parameters():
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.ones_like(p), "exp_avg_sq": torch.ones_like(p)}
    return d, optimizer, x, child


def test_a_rotated_parent_child_pair_becomes_the_parent_and_the_child() -> None:
    d, optimizer, x, child = _rotated_pair()
    before = {name: p.detach().clone() for name, p in d.named_parameters()}
    # naive: the kept latent's new rows are the pair's mean contribution on the rows both fire on
    pre = (x - d.b_dec) @ d.W_enc + d.b_enc
    keep = pre.flatten().topk(2 * x.shape[0]).values[-1]
    z = torch.where(pre >= keep, pre, torch.zeros_like(pre)).relu().detach()
    both = (z[:, 0] > 0) & (z[:, 1] > 0)
    assert both.float().mean() > 0.5  # the pair fires together on most parent rows
    mean = z[both][:, :2].mean(0)
    expected_dec = torch.nn.functional.normalize(mean[0] * before["W_dec"][0] + mean[1] * before["W_dec"][1], dim=0)
    expected_enc = mean[0] * before["W_enc"][:, 0] + mean[1] * before["W_enc"][:, 1]
    expected_enc = expected_enc / expected_enc.norm() * before["W_enc"][:, 0].norm()

    merged, restarted = resample_latents(d, optimizer, x, None, torch.Generator().manual_seed(1))

    assert (merged, restarted) == (1, 4)  # the pair; latent 1 freed, and the three dead ones
    torch.testing.assert_close(d.W_dec[0], expected_dec)
    torch.testing.assert_close(d.W_enc[:, 0], expected_enc)
    assert float(d.W_dec[0, 0].detach()) > 0.99  # the parent's direction (child rows where v > 0 tilt it a little)
    # the freed latent and the dead ones restart at residuals: after the merge, the child's rows
    # are the only ones left unexplained (the residual is the child), and each encoder column is
    # the same direction at RESAMPLE_ENCODER_SCALE of the live columns' mean norm
    live_norm = before["W_enc"][:, [0, 2]].norm(dim=0)
    live_norm[0] = expected_enc.norm()
    for latent in (1, 3, 4, 5):
        assert abs(float(d.W_dec[latent, 1])) > 0.99, latent
        torch.testing.assert_close(d.W_enc[:, latent], d.W_dec[latent] * RESAMPLE_ENCODER_SCALE * live_norm.mean())
        assert float(d.b_enc[latent]) == 0 and int(d.tokens_since_fired[latent]) == 0
    torch.testing.assert_close(d.W_dec[2], before["W_dec"][2], rtol=0, atol=0)  # untouched
    # fresh Adam moments where the latents changed, and nowhere else
    moments = optimizer.state[d.W_dec]["exp_avg"]
    assert torch.all(moments[[0, 1, 3, 4, 5]] == 0) and torch.all(moments[2] == 1)
    assert torch.all(optimizer.state[d.W_enc]["exp_avg_sq"][:, [0, 1, 3, 4, 5]] == 0)
    assert torch.all(optimizer.state[d.b_dec]["exp_avg"] == 1)


def test_a_parent_and_its_child_are_not_merged() -> None:
    """A child fires on all of its own rows with its parent but on few of the parent's: no merge."""
    d, optimizer, x, child = _rotated_pair()
    with torch.no_grad():  # the true parent and child instead of the rotated pair
        d.W_dec[0], d.W_dec[1] = torch.eye(D)[0], torch.eye(D)[1]
        d.W_enc[:, 0], d.W_enc[:, 1] = torch.eye(D)[0] * 0.9, torch.eye(D)[1] * 0.9
    merged, _ = resample_latents(d, optimizer, x, None, torch.Generator().manual_seed(1))
    assert merged == 0
    torch.testing.assert_close(d.W_dec[:3], torch.eye(D)[:3])


def test_cofiring_pairs_count_the_rows_each_pair_shares_as_a_dense_count_does() -> None:
    generator = torch.Generator().manual_seed(3)
    active = torch.rand(200, 30, generator=generator) < 0.15
    active[5] = True  # one row with every latent active
    rows, cols = active.nonzero(as_tuple=True)
    i, j, shared = cofiring_pairs(rows, cols, 30)
    dense = active.float().T @ active.float()
    expected = {(a, b): int(dense[a, b]) for a in range(30) for b in range(a + 1, 30) if dense[a, b] > 0}
    assert dict(zip(zip(i.tolist(), j.tolist()), shared.tolist())) == expected


def test_restarting_is_refused_where_it_has_no_meaning() -> None:
    with pytest.raises(ConfigError, match="resample_at"):
        DictionaryConfig(d_in=D, width=WIDTH, k=None, arch="relu", resample_at=[0.5])
    with pytest.raises(ConfigError, match="resample_at"):
        DictionaryConfig(d_in=D, width=WIDTH, k=2, resample_at=[1.0])
    with pytest.raises(ConfigError, match="cofire_ratio"):
        DictionaryConfig(d_in=D, width=WIDTH, k=2, cofire_ratio=0)


def test_a_pair_seen_together_on_a_few_rows_only_is_not_merged() -> None:
    """Two rare latents that meet on all of their 5 rows: a ratio of 1 on too few rows to mean anything."""
    d, optimizer, x, _ = _rotated_pair()
    x[:5, 3] = x[:5, 4] = 1.0
    with torch.no_grad():
        for latent, feature in ((3, 3), (4, 4)):
            d.W_dec[latent] = torch.eye(D)[feature]
            d.W_enc[:, latent] = torch.eye(D)[feature] * 0.9
        d.tokens_since_fired[3:5] = 0
    merged, _ = resample_latents(d, optimizer, x, None, torch.Generator().manual_seed(1))
    assert merged == 1  # the rotated pair only
    torch.testing.assert_close(d.W_dec[3:5], torch.eye(D)[3:5])


def test_a_transcoders_dead_latents_restart_at_one_rows_input_and_residual() -> None:
    """Transcoder: the restarted decoder row is a row's residual (at the live rows' mean norm), its
    encoder column that same row's centred input; checked against a naive dense computation."""
    torch.manual_seed(0)
    d = Dictionary(DictionaryConfig(d_in=D, d_out=5, width=WIDTH, k=2.0, arch="batchtopk", transcoder=True,
                                    resample_at=[0.5], cofire_ratio=1.0, dead_tokens=100))  # no merges
    x, y = torch.randn(64, D), torch.randn(64, 5)
    d.set_scales(float(x.norm(dim=1).mean()), float(y.norm(dim=1).mean()))
    with torch.no_grad():
        d.W_dec.copy_(torch.randn(WIDTH, 5))
        d.tokens_since_fired[4:] = 1000
    live = torch.arange(WIDTH) < 4
    pre = d.pre_activations(x)
    cutoff = pre.flatten().topk(2 * 64).values[-1]
    z = torch.where(pre >= cutoff, pre, torch.zeros_like(pre)).relu() * live
    residual = (d.scaled_target(x, y) - z @ d.W_dec - d.b_dec).detach()
    inputs = torch.nn.functional.normalize(d.centered_input(x), dim=1).detach()
    live_dec, live_enc = d.W_dec[:4].norm(dim=1).mean().detach(), d.W_enc[:, :4].norm(dim=0).mean().detach()
    optimizer = torch.optim.Adam(d.parameters())
    assert resample_latents(d, optimizer, x, y, torch.Generator().manual_seed(1)) == (0, 2)
    for latent in (4, 5):
        row = int((torch.nn.functional.normalize(residual, dim=1) @ d.W_dec[latent].detach()).argmax())
        torch.testing.assert_close(d.W_dec[latent], torch.nn.functional.normalize(residual[row], dim=0) * live_dec)
        torch.testing.assert_close(d.W_enc[:, latent], inputs[row] * RESAMPLE_ENCODER_SCALE * live_enc)
