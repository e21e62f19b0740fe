"""A short training run with our loss finds known sparse directions (no store needed)."""

from __future__ import annotations

import pytest
import torch

from kukla.pipeline.dictionary import Dictionary, DictionaryConfig
from steps import adam_step


def _sparse_rows(n: int, directions: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each row: a few of the true directions with random positive magnitudes, plus an offset."""
    active = torch.rand(n, directions.shape[0], generator=gen) < 0.08
    magnitudes = torch.rand(n, directions.shape[0], generator=gen) * 2 + 0.5
    return (active * magnitudes) @ directions + 0.3


@pytest.mark.slow
def test_matryoshka_batchtopk_recovers_known_sparse_directions():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    directions = torch.randn(40, 32, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    d = Dictionary(DictionaryConfig(d_in=32, width=64, k=3.2, arch="matryoshka-batchtopk", levels=[16, 64],
                                    dead_tokens=20_000, aux_k=16))
    sample = _sparse_rows(4096, directions, gen)
    d.set_scales(float(sample.norm(dim=1).mean()))
    d.initialize(sample)
    optimizer = torch.optim.Adam(d.parameters(), lr=3e-3)
    for _ in range(400):
        out = adam_step(d, optimizer, _sparse_rows(256, directions, gen))
    best = (directions @ d.W_dec.detach().t()).max(dim=1).values
    assert float(best.mean()) >= 0.95
    assert out.metrics["fvu"] < 0.15
    assert out.metrics["fvu/level_16"] > out.metrics["fvu"]  # the short prefix explains less, but something
