"""Prefix schemes: Nabeshima's sampler follows P(l) ∝ √l − √(l−1) and always keeps the full width."""

from __future__ import annotations

import math

import torch
from scipy.stats import chisquare

from kukla.pipeline.dictionary import DictionaryConfig
from kukla.pipeline.dictionary.prefixes import prefix_weights, sample_prefix_lengths


def test_sampled_prefix_lengths_follow_nabeshima_distribution_without_replacement():
    width, n = 20, 20_000
    generator = torch.Generator().manual_seed(0)
    firsts = [sample_prefix_lengths(width, 1, generator).tolist() for _ in range(n)]
    assert all(len(d) == 2 and d[-1] == width and d[0] < width for d in firsts)
    counts = torch.bincount(torch.tensor([d[0] for d in firsts]), minlength=width)[1:].double()
    p = torch.tensor([math.sqrt(l) - math.sqrt(l - 1) for l in range(1, width)], dtype=torch.float64)
    assert chisquare(counts.numpy(), (p / p.sum() * n).numpy()).pvalue > 1e-3
    assert chisquare(counts.numpy()).pvalue < 1e-6  # not uniform: short prefixes are drawn far more often
    many = sample_prefix_lengths(width, width - 1, generator).tolist()  # without replacement: every length once
    assert many == list(range(1, width + 1))


def test_every_batch_of_sampled_prefixes_includes_the_full_width_with_weights_summing_to_one():
    cfg = DictionaryConfig(d_in=8, width=512, k=4, arch="matryoshka-prefix", n_prefixes=9)
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        widths, weights = prefix_weights(cfg, generator)
        widths = widths.tolist()
        assert widths[-1] == 512 and widths == sorted(set(widths))
        assert len(widths) == 10 and weights == [0.1] * 10


def test_fixed_levels_default_to_equal_weights_and_explicit_weights_are_used_as_given():
    cfg = DictionaryConfig(d_in=8, width=64, k=4, levels=[8, 32, 64])
    assert prefix_weights(cfg) == ([8, 32, 64], [1 / 3] * 3)
    cfg = DictionaryConfig(d_in=8, width=64, k=4, levels=[8, 32, 64], level_weights=[1, 1, 1])
    assert prefix_weights(cfg) == ([8, 32, 64], [1.0, 1.0, 1.0])
