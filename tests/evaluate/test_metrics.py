"""Reconstruction metrics against direct numpy float64 computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kukla.pipeline.evaluate.latents import nearest_latents
from kukla.pipeline.toy import best_match
from kukla.pipeline.dictionary import Dictionary, DictionaryConfig
from kukla.pipeline.evaluate.reconstruction import ReconstructionStats


def _stream(stats: ReconstructionStats, x: torch.Tensor, recon: torch.Tensor, z: torch.Tensor, batch: int) -> None:
    for start in range(0, x.shape[0], batch):
        sl = slice(start, start + batch)
        stats.update(x[sl], recon[sl], z[sl])


def _data(n: int = 1000, d: int = 12, offset: float = 50.0) -> torch.Tensor:
    # A large common offset: variance around zero would be far from the centred variance.
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1)) * 2.0 + offset


def test_explained_variance_is_zero_for_the_mean_predictor_and_one_for_the_identity() -> None:
    x = _data()
    z = torch.zeros(x.shape[0], 4)
    mean_stats, identity_stats = ReconstructionStats(4, [4]), ReconstructionStats(4, [4])
    _stream(mean_stats, x, x.mean(0).expand_as(x), z, 128)
    _stream(identity_stats, x, x.clone(), z, 128)
    assert abs(mean_stats.summary()["explained_variance"]) < 1e-9
    assert abs(mean_stats.summary()["fvu"] - 1.0) < 1e-9
    assert identity_stats.summary()["explained_variance"] == 1.0
    assert identity_stats.summary()["mse"] == 0.0


def test_metrics_match_numpy_float64_and_do_not_depend_on_batch_size() -> None:
    g = torch.Generator().manual_seed(2)
    x = _data()
    recon = x + 0.7 * torch.randn(x.shape, generator=g)
    z = torch.relu(torch.randn(x.shape[0], 30, generator=g) - 1.0)
    xn, rn, zn = x.double().numpy(), recon.double().numpy(), z.numpy()
    ev = 1 - ((xn - rn) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    mse = ((xn - rn) ** 2).mean()
    cos = np.mean((xn * rn).sum(1) / np.linalg.norm(xn, axis=1) / np.linalg.norm(rn, axis=1))
    l0 = (zn != 0).sum(1)
    summaries = []
    for batch in (1000, 97, 8):
        stats = ReconstructionStats(30, [30])
        _stream(stats, x, recon, z, batch)
        summaries.append(stats.summary())
    for s in summaries:
        assert abs(s["explained_variance"] - ev) < 1e-10
        assert abs(s["mse"] - mse) < 1e-10
        assert abs(s["cosine"] - cos) < 1e-6
        assert abs(s["l0"] - l0.mean()) < 1e-12
        assert s["l0_histogram"]["count"][: l0.max() + 1] == np.bincount(l0).tolist()
        assert s["dead_latents"] == int(((zn != 0).sum(0) == 0).sum())
        assert s["dense_latents_above_0.1"] == int(((zn != 0).mean(0) > 0.1).sum())
    assert summaries[0]["log10_density_histogram"] == summaries[2]["log10_density_histogram"]


def test_per_level_metrics_match_masking_the_codes_by_hand() -> None:
    g = torch.Generator().manual_seed(3)
    d, width, levels = 10, 24, [4, 10, 24]
    w_dec = torch.randn(width, d, generator=g)
    b_dec = torch.randn(d, generator=g)
    x = torch.randn(500, d, generator=g)
    z = torch.relu(torch.randn(500, width, generator=g))

    dictionary = Dictionary(DictionaryConfig(d_in=d, width=width, arch="relu", levels=levels))
    with torch.no_grad():
        dictionary.W_dec.copy_(w_dec)
        dictionary.b_dec.copy_(b_dec)
        dictionary.target_scale.fill_(2.0)  # decode divides by it: raw units
    w_dec, b_dec = w_dec / 2, b_dec / 2

    stats = ReconstructionStats(width, levels)
    for start in range(0, 500, 64):
        zb = z[start:start + 64]
        with torch.no_grad():
            prefixes = dictionary.decode_prefixes(zb, levels)
        torch.testing.assert_close(prefixes[-1], dictionary.decode(zb))
        stats.update(x[start:start + 64], prefixes[-1], zb, prefixes)
    xn = x.double().numpy()
    for level, width_w in zip(stats.summary()["levels"], levels):
        zw = z.double().numpy()[:, :width_w]
        recon = zw @ w_dec.double().numpy()[:width_w] + b_dec.double().numpy()
        ev = 1 - ((xn - recon) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
        assert abs(level["explained_variance"] - ev) < 1e-5
        assert abs(level["l0"] - (zw != 0).sum(1).mean()) < 1e-12
    assert abs(stats.summary()["levels"][-1]["explained_variance"] - stats.summary()["explained_variance"]) < 1e-9


def test_decoder_max_cosine_matches_the_full_matrix_when_chunked() -> None:
    w = torch.randn(300, 16, generator=torch.Generator().manual_seed(4))
    unit = w.double() / w.double().norm(dim=1, keepdim=True)
    full = unit @ unit.T
    full.fill_diagonal_(-2)
    chunked = nearest_latents(w, 8, chunk_elements=300 * 7)[0][:, 0]  # the report's decoder max cosine
    assert torch.allclose(chunked.double(), full.max(1).values, atol=1e-5)
    truth = w[[5, 17]] * 3.0
    value, index = best_match(truth, w, chunk_elements=300)
    assert index.tolist() == [5, 17] and torch.allclose(value, torch.ones(2), atol=1e-5)


def test_ev_without_massive_rows_l0_tail_and_worst_rows_match_numpy() -> None:
    g = torch.Generator().manual_seed(4)
    x = _data(2000)
    x[[5, 700, 1999]] *= 9.0  # massive-activation rows
    recon = x + 0.5 * torch.randn(x.shape, generator=g)
    recon[[5, 700, 1999]] = x.mean(0)  # badly reconstructed
    z = torch.relu(torch.randn(2000, 64, generator=g) - 0.5)
    rows = torch.arange(2000) + 10_000  # store rows of the scored split
    stats = ReconstructionStats(64, [16, 64])
    for start in range(0, 2000, 300):
        sl = slice(start, start + 300)
        stats.update(x[sl], recon[sl], z[sl], [recon[sl] + 1.0, recon[sl]], rows[sl])
    excluded = torch.tensor([10_005, 10_700, 11_999])
    tails = stats.tails(excluded, x[excluded - 10_000].double().sum(0))

    xn, rn, l0 = x.double().numpy(), recon.double().numpy(), (z.numpy() != 0).sum(1)
    keep = np.ones(2000, bool)
    keep[[5, 700, 1999]] = False
    ev_keep = 1 - ((xn - rn)[keep] ** 2).sum() / ((xn[keep] - xn[keep].mean(0)) ** 2).sum()
    ev_level = 1 - ((xn - rn - 1.0)[keep] ** 2).sum() / ((xn[keep] - xn[keep].mean(0)) ** 2).sum()
    share = 1 - ((xn[keep] - xn[keep].mean(0)) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert tails["explained_variance_without_massive"] == pytest.approx(ev_keep, abs=1e-9)
    assert tails["levels_without_massive"][0]["explained_variance"] == pytest.approx(ev_level, abs=1e-9)
    assert tails["massive_variance_share"] == pytest.approx(share, abs=1e-9) and tails["massive_rows_excluded"] == 3
    none = stats.tails(torch.tensor([], dtype=torch.long), torch.zeros(x.shape[1], dtype=torch.float64))
    assert none["massive_variance_share"] == 0.0 and none["massive_rows_excluded"] == 0  # exactly: no rounding residue
    for key, q in (("p99", 99), ("p99.9", 99.9)):
        assert tails["l0_tail"][key] == int(np.percentile(l0, q, method="inverted_cdf"))
    assert tails["l0_tail"]["max"] == l0.max()
    errors = ((xn - rn) ** 2).sum(1)
    worst = tails["worst_rows"]
    assert [w["row"] for w in worst] == list(np.argsort(-errors)[:5] + 10_000)
    assert {w["row"] for w in worst[:3]} == set(excluded.tolist()) and all(w["massive"] for w in worst[:3])
    assert worst[0]["error_share"] == pytest.approx(errors.max() / errors.sum(), rel=1e-9)
    norms = np.linalg.norm(xn, axis=1)
    assert worst[0]["norm_over_median"] == pytest.approx(norms[worst[0]["row"] - 10_000] / np.percentile(norms, 50, method="lower"), rel=1e-9)
    assert worst[0]["l0"] == l0[worst[0]["row"] - 10_000]
