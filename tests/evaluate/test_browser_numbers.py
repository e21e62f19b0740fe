"""The latent browser's numbers against naive float64 computations: nearest latents, logit lens,
co-firing tree, cross-dictionary correlation, activation histograms, context shading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kukla.pipeline.dictionary import load_dictionary
from kukla.pipeline.evaluate.latents import nearest_latents
from kukla.pipeline.evaluate.browser import context_activations, lens_path, logit_lens
from kukla.pipeline.evaluate.latents import (HISTOGRAM_EDGES, MIN_CHILD_FIRINGS, ActivationHistogram, CoFiring,
                                             max_correlation, mean_max_correlation)
from kukla.storage import open_store
from tests.evaluate.helpers import D, HOOK, make_dictionary


def _sparse_codes(g: torch.Generator, n: int, width: int, p: float = 0.2) -> torch.Tensor:
    return torch.rand(n, width, generator=g) * (torch.rand(n, width, generator=g) < p)


def test_nearest_latents_are_the_largest_cosines_to_other_rows(rng: torch.Generator) -> None:
    w = torch.randn(50, 6, generator=rng)
    unit = w.double().numpy() / np.linalg.norm(w.double().numpy(), axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    values, index = nearest_latents(w, 3, chunk_elements=7 * 50)  # 7 rows per chunk
    expected = np.argsort(-cos, axis=1)[:, :3]
    np.testing.assert_array_equal(index.numpy(), expected)
    np.testing.assert_allclose(values.numpy(), np.take_along_axis(cos, expected, 1), atol=1e-6)
    few_values, few_index = nearest_latents(w[:2], 3)
    assert few_index[:, 1:].eq(-1).all() and few_values[:, 1:].isnan().all()
    assert few_index[:, 0].tolist() == [1, 0]


def test_logit_lens_is_the_decoder_times_the_unembedding(rng: torch.Generator) -> None:
    w_dec, w_u = torch.randn(20, 6, generator=rng), torch.randn(6, 30, generator=rng)
    logits = w_dec.double().numpy() @ w_u.double().numpy()
    lens = logit_lens(w_dec, w_u, 4, chunk_elements=3 * 30)
    np.testing.assert_array_equal(lens["top_ids"].numpy(), np.argsort(-logits, 1)[:, :4])
    np.testing.assert_array_equal(lens["bottom_ids"].numpy(), np.argsort(logits, 1)[:, :4])
    np.testing.assert_allclose(lens["top_values"].numpy(), -np.sort(-logits, 1)[:, :4], rtol=1e-5)
    assert "logit lens" in lens_path("blocks.3.hook_resid_post", 6, 6)
    assert "direct path" in lens_path("blocks.3.hook_mlp_out", 6, 6)
    assert lens_path("blocks.3.mlp.hook_post", 24, 6) is None


def test_each_later_latent_hangs_under_the_earlier_latent_it_predicts_beyond_chance(rng: torch.Generator) -> None:
    levels = [4, 10, 24]
    z = _sparse_codes(rng, 600, 24, p=0.3)
    z[:, 1] = (torch.rand(600, generator=rng) < 0.9).float()  # 1 fires on 90 % of tokens: beside anything
    z[:, 12] = z[:, 2] * (torch.rand(600, generator=rng) < 0.8)  # 12 fires only inside 2
    z[:, 5] = 0  # 5 never fires: no parent
    z[:, 20] = 0
    z[:3, 20] = z[:3, 2].clamp(min=1)  # 20 fires 3 times, inside 2: too few firings to say
    cofiring = CoFiring(levels)
    for batch in z.split(64):
        cofiring.update(batch)
    parent, fraction = cofiring.tree()
    fired = (z > 0).double().numpy()
    density = fired.mean(0)
    starts = [0, 4, 10]
    for j in range(24):
        level = int(np.searchsorted(levels, j, side="right"))
        candidates = list(range(min(starts[level], cofiring.parents)))
        if not candidates or fired[:, j].sum() < MIN_CHILD_FIRINGS:
            assert parent[j] == -1
            continue
        share = [(fired[:, i] * fired[:, j]).sum() / fired[:, j].sum() for i in candidates]
        kappa = [(share[n] - density[i]) / (1 - density[i]) for n, i in enumerate(candidates)]
        best = int(np.argmax(kappa))
        if kappa[best] >= 0.5:
            assert parent[j] == candidates[best] and fraction[j] == pytest.approx(share[best], abs=1e-6)
        else:
            assert parent[j] == -1 and fraction[j].isnan()
    assert parent[12] == 2 and fraction[12] == pytest.approx(1.0)
    assert not (parent == 1).any(), "a latent firing on 90 % of tokens fires beside every latent by chance"
    assert (parent[:4] == -1).all() and parent[5] == -1 and parent[20] == -1
    assert CoFiring([24]).tree()[0].eq(-1).all()  # a plain dictionary has no tree


def test_max_correlation_equals_numpy_corrcoef_and_skips_dead_latents(rng: torch.Generator) -> None:
    z_a, z_b = _sparse_codes(rng, 300, 10), _sparse_codes(rng, 300, 14)
    z_b[:, 3] = 2 * z_a[:, 7] + 0.1  # a perfect match for latent 7
    z_a[:, 0] = 0  # dead in A
    z_b[:, 5] = 0  # dead in B: never a match
    best, index = max_correlation(z_a, z_b, chunk_elements=3 * 14)
    corr = np.corrcoef(z_a.double().numpy().T, z_b.double().numpy().T)[:10, 10:]
    corr[:, 5] = -np.inf
    for i in range(1, 10):
        assert index[i] == int(np.argmax(corr[i])) and best[i] == pytest.approx(corr[i].max(), abs=1e-5)
    assert best[0].isnan() and index[0] == -1
    assert index[7] == 3 and best[7] == pytest.approx(1.0, abs=1e-5)
    assert mean_max_correlation(best) == pytest.approx(np.mean(corr[1:].max(1)), abs=1e-5)


def test_activation_histogram_counts_each_latents_nonzero_activations(rng: torch.Generator) -> None:
    z = _sparse_codes(rng, 500, 6) * torch.logspace(-4, 5, 500)[:, None]
    hist = ActivationHistogram(6)
    for batch in z.split(77):
        hist.update(batch)
    edges = HISTOGRAM_EDGES.numpy().copy()
    edges[0], edges[-1] = 0, np.inf  # values beyond the ends land in the end bins
    for f in range(6):
        values = z[:, f].numpy()
        expected = np.histogram(values[values > 0], bins=edges)[0]
        np.testing.assert_array_equal(hist.counts[f].numpy(), expected)


def test_context_shading_is_each_rows_own_code_and_leaves_unread_rows_empty(tmp_path: Path, rows_store: Path) -> None:
    g = torch.Generator().manual_seed(3)
    path = make_dictionary(tmp_path / "d", torch.randn(D, 5, generator=g), torch.randn(5, D, generator=g), hook=HOOK)
    dictionary = load_dictionary(path).eval()
    store = open_store(rows_store)
    rows = np.array([5, 2999, -1, 1500, 5, 42], dtype=np.int64)
    latents = np.array([0, 4, 2, 3, 1, 2], dtype=np.int64)
    with torch.no_grad():
        values = context_activations(store, HOOK, dictionary.encode, rows, latents, "cpu")
        for row, latent, value in zip(rows, latents, values):
            if row < 0:
                assert np.isnan(value)
                continue
            x = store.read(HOOK, int(row), int(row) + 1)
            assert value == pytest.approx(float(dictionary.encode(x)[0, latent]), rel=1e-5, abs=1e-6)
        unread = context_activations(store, HOOK, dictionary.encode, rows, latents, "cpu", max_rows=0)
    assert np.isnan(unread).all()  # beyond the read budget: no value, never a made-up one
