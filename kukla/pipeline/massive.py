"""Massive-activation rows: a few tokens whose norm is many times the median.

On Gemma-3-270m `resid_post:9` 3 of 6,000 held-out rows had ~9× the median norm and held 38%
of the variance, so a dictionary's EV and L0 are dominated by them. Harvest flags them in a
row-aligned uint8 array `tokens/massive` (rule and ratio in the store's `meta["massive"]`);
stores without it (older or imported) get the same norm rule applied by evaluate.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kukla.errors import KuklaError
from kukla.pipeline.harvest.massive import MASSIVE_RATIO  # one default for harvest's flags and evaluate's
from kukla.storage import Store

MASSIVE = "tokens/massive"
"""The store's row-aligned massive-activation flags (uint8, 1 = massive)."""


def massive_ratio(store: Store) -> float:
    """The ratio the store's harvest flagged with, else the default."""
    rule = store.meta.get("massive")
    return float(rule["ratio"]) if isinstance(rule, dict) and "ratio" in rule else MASSIVE_RATIO


def has_flags(store: Store) -> bool:
    return MASSIVE in store.specs


def massive_rows(store: Store, start: int = 0, stop: int | None = None) -> Tensor:
    """Sorted indices of the rows in [start, stop) that the store flags as massive."""
    if not has_flags(store):
        raise KuklaError(f"store {store.url} has no {MASSIVE} flags (harvested by an older kukla or imported): "
                         "re-harvest it, or train with massive = keep")
    stop = store.n_rows if stop is None else stop
    step = 1 << 22
    parts = [np.flatnonzero(store.read_stored(MASSIVE, lo, min(lo + step, stop))) + lo
             for lo in range(start, stop, step)]
    return torch.from_numpy(np.concatenate(parts or [np.empty(0, np.int64)]).astype(np.int64))


def massive_by_norm(norms: Tensor, ratio: float) -> Tensor:
    """Rows whose norm exceeds `ratio` × the median norm of these rows."""
    if norms.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    return norms > ratio * norms.median()
