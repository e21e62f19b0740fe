"""The training objective against naive, independently written computations."""

from __future__ import annotations

import pytest
import torch

from kukla.pipeline.dictionary import Dictionary, DictionaryConfig
from kukla.pipeline.dictionary.prefixes import sample_prefix_lengths


def _dictionary(seed: int = 0, **overrides) -> tuple[Dictionary, torch.Tensor]:
    torch.manual_seed(seed)
    settings = dict(d_in=12, width=48, k=3.0, arch="matryoshka-batchtopk", levels=[4, 12, 28, 48])
    settings.update(overrides)
    dictionary = Dictionary(DictionaryConfig(**settings))
    x = torch.randn(40, 12) * 2 + 0.5
    dictionary.set_scales(float(x.norm(dim=1).mean()))
    dictionary.initialize(x)
    with torch.no_grad():  # break the W_enc = W_decᵀ symmetry so gradient checks see every term
        dictionary.W_enc.add_(0.1 * torch.randn_like(dictionary.W_enc))
        dictionary.b_enc.add_(0.1 * torch.randn_like(dictionary.b_enc))
    return dictionary, x


def _naive_batch_topk_codes(pre: torch.Tensor, k: float) -> torch.Tensor:
    """relu(pre) where pre is among the round(k·B) largest entries of the batch, by a full sort."""
    acts = pre.relu()
    n = round(k * pre.shape[0])
    cutoff = acts.flatten().sort(descending=True).values[n - 1]
    return acts * (acts >= cutoff)


def _naive_prefix_loss(d: Dictionary, x: torch.Tensor, prefixes: list[int], weights: list[float]) -> torch.Tensor:
    """Σ w · FVU with one full decode per prefix (what the cumulative sum must equal)."""
    x_s = x * d.input_scale
    z = _naive_batch_topk_codes((x_s - d.b_dec) @ d.W_enc + d.b_enc, float(d.cfg.k))
    total_var = ((x_s - x_s.mean(0)) ** 2).sum()
    loss = torch.zeros(())
    for p, w in zip(prefixes, weights):
        recon = z[:, :p] @ d.W_dec[:p] + d.b_dec
        loss = loss + w * ((x_s - recon) ** 2).sum() / total_var
    return loss


def _grads(d: Dictionary, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [d.W_enc, d.b_enc, d.W_dec, d.b_dec]))


@pytest.mark.parametrize("sparse_path", [False, True])
def test_cumulative_matryoshka_loss_and_gradients_equal_per_prefix_computation(sparse_path):
    d, x = _dictionary(sparse_path=sparse_path, level_weights=[0.5, 1.0, 2.0, 0.25])
    out = d.training_loss(x)
    naive = _naive_prefix_loss(d, x, [4, 12, 28, 48], [0.5, 1.0, 2.0, 0.25])
    torch.testing.assert_close(out.loss, naive, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(_grads(d, out.loss), _grads(d, naive)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_default_level_weights_are_the_mean_over_levels():
    d, x = _dictionary()
    naive = _naive_prefix_loss(d, x, [4, 12, 28, 48], [0.25] * 4)
    torch.testing.assert_close(d.training_loss(x).loss, naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparse_path", [False, True])
def test_sampled_prefix_loss_averages_every_draw_including_full_width(sparse_path):
    d, x = _dictionary(arch="matryoshka-prefix", levels=None, n_prefixes=6, sparse_path=sparse_path)
    out = d.training_loss(x, generator=torch.Generator().manual_seed(5))
    draws = sample_prefix_lengths(48, 6, torch.Generator().manual_seed(5))
    assert draws[-1] == 48 and len(draws) == 7
    naive = _naive_prefix_loss(d, x, draws, [1 / 7] * 7)
    torch.testing.assert_close(out.loss, naive, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(_grads(d, out.loss), _grads(d, naive)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
