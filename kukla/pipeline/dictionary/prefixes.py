"""Which nested prefixes of the dictionary are trained to reconstruct, and with what weight.

A Matryoshka loss is Σⱼ wⱼ · FVU(prefix pⱼ). Fixed levels (Bussmann et al.) use the same
widths every batch; sampled prefixes (Nabeshima) draw lengths l with P(l) ∝ √l − √(l−1),
which favours short prefixes (the CDF is √(l/F)) so the first latents learn general features;
all prefixes (block size 1) weight every length by its expected share of those draws.

Every scheme is also a cumulative weight C(l) = Σ_{p ≤ l} w_p over lengths 0..F: latent i is in
every prefix longer than i, so its share of a per-prefix penalty is the tail mass 1 − C(i).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from kukla.pipeline.dictionary.config import DictionaryConfig


def prefix_probabilities(width: int) -> Tensor:
    """[F] float64: P(l) = (√l − √(l−1))/√F for l = 1..F."""
    root = torch.arange(width + 1, dtype=torch.float64).sqrt()
    return (root[1:] - root[:-1]) / root[-1]


@functools.lru_cache(maxsize=8)
def _draw_probabilities(width: int, device: torch.device) -> Tensor:
    """P(l) for l = 1..F−1, copied to the device once (a copy per step would wait for it)."""
    return prefix_probabilities(width)[:-1].to(device)


def sample_prefix_lengths(width: int, n: int, generator: torch.Generator | None = None) -> Tensor:
    """[n + 1]: n distinct lengths from 1..F−1 drawn with P(l) without replacement (Nabeshima),
    sorted, then F; drawn on the generator's device and never read back to the host there."""
    device = generator.device if generator is not None else torch.device("cpu")
    draws = torch.multinomial(_draw_probabilities(width, device), n, replacement=False, generator=generator) + 1
    return torch.cat([draws.sort().values, draws.new_full((1,), width)])


@functools.lru_cache(maxsize=8)
def all_prefix_cdf(width: int, n_prefixes: int, device: torch.device = torch.device("cpu")) -> Tensor:
    """[F+1] float64 C(l) of the all-prefix scheme: w_l = n/(n+1)·P(l) + [l = F]/(n+1), the chance
    that one of n + 1 equally weighted draws (n with P, plus the full width) has length l.
    Made once per device."""
    n = n_prefixes
    cdf = torch.zeros(width + 1, dtype=torch.float64)
    cdf[1:] = prefix_probabilities(width).cumsum(0) * n / (n + 1)
    cdf[-1] = 1.0
    return cdf.to(device)


def prefix_weights(cfg: DictionaryConfig, generator: torch.Generator | None = None) -> tuple[list[int] | Tensor, list[float]]:
    """Distinct prefix widths (increasing, ending at F) and the weight of each one's FVU.

    Sampled: n_prefixes distinct lengths plus F, each weighing 1/(n+1), the lengths a tensor on
    the generator's device. All prefixes: the full width alone, since the closed form takes every
    length's weight from `prefix_cdf` (an F-long list per step would be work for nothing).
    """
    if cfg.prefixes in ("none", "all"):
        return [cfg.width], [1.0]
    if cfg.prefixes == "levels":
        assert cfg.levels is not None
        widths = [int(w) for w in cfg.levels]
        raw = cfg.level_weights or [1.0] * len(widths)
        return widths, [float(w) / (1 if cfg.level_weights else len(widths)) for w in raw]
    draws = sample_prefix_lengths(cfg.width, cfg.n_prefixes, generator)
    return draws, [1 / len(draws)] * len(draws)


def cumulative_weight(widths: list[int] | Tensor, weights: list[float], width: int,
                      device: torch.device = torch.device("cpu")) -> Tensor:
    """[F+1] float64 C(l) = Σ_{p ≤ l} w_p of explicit prefixes, on the device: fixed ones made
    once, drawn ones (a tensor there, equal weights) without leaving it."""
    if not isinstance(widths, Tensor):
        return _fixed_cumulative_weight(tuple(widths), tuple(weights), width, device)
    equal = torch.full(widths.shape, weights[0], dtype=torch.float64, device=device)
    return torch.zeros(width + 1, dtype=torch.float64, device=device).index_add_(0, widths, equal).cumsum(0)


@functools.lru_cache(maxsize=8)
def _fixed_cumulative_weight(widths: tuple[int, ...], weights: tuple[float, ...], width: int,
                             device: torch.device) -> Tensor:
    cdf = torch.zeros(width + 1, dtype=torch.float64)
    cdf.index_add_(0, torch.tensor(widths), torch.tensor(weights, dtype=torch.float64))
    return cdf.cumsum(0).to(device)


def spread_cumulative_weight(widths: list[int], weights: list[float], width: int,
                             device: torch.device = torch.device("cpu")) -> Tensor:
    """[F+1] float64 C(l) of spread levels: level j's weight w_j split evenly over its lengths
    (p_{j−1}, p_j], so C is linear between the level points and C(p_j) = w_1 + … + w_j as with steps."""
    return _spread_cumulative_weight(tuple(widths), tuple(weights), width, device)


@functools.lru_cache(maxsize=8)
def _spread_cumulative_weight(widths: tuple[int, ...], weights: tuple[float, ...], width: int,
                              device: torch.device) -> Tensor:
    cdf = torch.zeros(width + 1, dtype=torch.float64)
    start, total = 0, 0.0
    for end, w in zip(widths, weights):
        cdf[start + 1:end + 1] = total + w * torch.arange(1, end - start + 1, dtype=torch.float64) / (end - start)
        start, total = end, total + w
    return cdf.to(device)


def prefix_cdf(cfg: DictionaryConfig, widths: list[int] | Tensor, weights: list[float],
               device: torch.device = torch.device("cpu")) -> Tensor:
    """[F+1] float64 C(l) of the config's scheme on the device, given this batch's `prefix_weights`."""
    if cfg.prefixes == "all":
        return all_prefix_cdf(cfg.width, cfg.n_prefixes, device)
    if cfg.spread_levels:
        assert isinstance(widths, list)  # fixed levels
        return spread_cumulative_weight(widths, weights, cfg.width, device)
    return cumulative_weight(widths, weights, cfg.width, device)


def tail_mass(cdf: Tensor) -> Tensor:
    """[F] latent i's total weight over the prefixes that contain it (lengths above i): C(F) − C(i)."""
    return cdf[-1] - cdf[:-1]
