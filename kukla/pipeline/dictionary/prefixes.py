"""Which nested prefixes of the dictionary are trained to reconstruct, and with what weight.

A Matryoshka loss is Σⱼ wⱼ · FVU(prefix pⱼ). Fixed levels (Bussmann et al.) use the same
widths every batch; sampled prefixes (Nabeshima) draw lengths l with P(l) ∝ √l − √(l−1),
which favours short prefixes (the CDF is √(l/F)) so the first latents learn general features.
"""

from __future__ import annotations

import torch

from kukla.pipeline.dictionary.config import DictionaryConfig


def sample_prefix_lengths(width: int, n: int, generator: torch.Generator | None = None) -> list[int]:
    """n lengths drawn with P(l) = (√l − √(l−1))/√F, l ∈ 1..F (by inverting the CDF √(l/F)), plus F."""
    u = 1.0 - torch.rand(n, generator=generator, dtype=torch.float64)  # (0, 1]
    lengths = torch.ceil(width * u * u).clamp(1, width).long()
    return [*lengths.tolist(), width]


def prefix_weights(cfg: DictionaryConfig, generator: torch.Generator | None = None) -> tuple[list[int], list[float]]:
    """Distinct prefix widths (increasing, ending at F) and the weight of each one's FVU.

    Repeated draws merge into one prefix whose weight counts the repeats, so every draw weighs
    1/(n+1) and the loss stays an unbiased estimate of the expected prefix loss.
    """
    if cfg.prefix_scheme == "none":
        return [cfg.width], [1.0]
    if cfg.prefix_scheme == "levels":
        assert cfg.levels is not None
        widths = [int(w) for w in cfg.levels]
        raw = cfg.level_weights or [1.0] * len(widths)
        return widths, [float(w) / (1 if cfg.level_weights else len(widths)) for w in raw]
    draws = sample_prefix_lengths(cfg.width, cfg.n_prefixes, generator)
    counts: dict[int, int] = {}
    for length in draws:
        counts[length] = counts.get(length, 0) + 1
    widths = sorted(counts)
    return widths, [counts[w] / len(draws) for w in widths]
