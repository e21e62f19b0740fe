"""Activation rules select exactly what their definitions say, on matrices big enough for the fast cutoff."""

from __future__ import annotations

import torch

from kukla.pipeline.dictionary.rules.batchtopk import select_batch_topk
from kukla.pipeline.dictionary.rules.topk import select_topk


def _naive_batch_topk(pre: torch.Tensor, n: int) -> set[tuple[int, int]]:
    order = pre.flatten().argsort(descending=True)[:n]
    return {(int(i) // pre.shape[1], int(i) % pre.shape[1]) for i in order if pre.flatten()[i] > 0}


def test_batch_topk_selects_the_k_times_batch_largest_entries_exactly():
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(512, 1280, generator=gen) + torch.linspace(-2, 1, 1280)  # latents differ in rate
    rows, cols = select_batch_topk(pre, 6.5)
    assert rows.numel() == round(6.5 * 512)
    assert set(zip(rows.tolist(), cols.tolist())) == _naive_batch_topk(pre, round(6.5 * 512))
    keys = rows * 1280 + cols
    assert torch.all(keys[1:] > keys[:-1])  # row-major, ascending columns: what the sparse decode expects


def test_batch_topk_is_exact_when_the_sampled_cutoff_misleads():
    pre = torch.randn(512, 1280, generator=torch.Generator().manual_seed(1))
    pre[:, :7] += 50.0  # a few hot latents: the sample overestimates how many pass the cutoff
    pre[0, 100] = 1000.0
    rows, cols = select_batch_topk(pre, 4.0)
    assert set(zip(rows.tolist(), cols.tolist())) == _naive_batch_topk(pre, 4 * 512)
    spiked = torch.randn(512, 1280, generator=torch.Generator().manual_seed(2))
    spiked.view(-1)[::11] += 100.0  # every strided-sampled entry huge: too few pass the cutoff, full top-k
    rows, cols = select_batch_topk(spiked, 4.0)
    assert set(zip(rows.tolist(), cols.tolist())) == _naive_batch_topk(spiked, 4 * 512)


def test_batch_topk_never_activates_non_positive_entries():
    pre = -torch.rand(64, 32)
    pre[3, 5] = 0.5
    rows, cols = select_batch_topk(pre, 2.0)
    # the top 128 entries, filled up with non-positive ones (kept so the GPU never waits to
    # count positives): only the positive one is active after relu
    assert rows.numel() == 128
    active = pre[rows, cols].relu() > 0
    assert list(zip(rows[active].tolist(), cols[active].tolist())) == [(3, 5)]


def test_topk_selects_each_rows_largest_in_column_order():
    pre = torch.randn(20, 30, generator=torch.Generator().manual_seed(2))
    rows, cols = select_topk(pre, 4)
    expected = pre.topk(4, dim=1).indices.sort(dim=1).values
    assert torch.equal(cols.view(20, 4), expected) and torch.equal(rows.view(20, 4)[:, 0], torch.arange(20))
