"""Massive-activation rows: a few tokens whose norm is many times the median, flagged and read back.

On Gemma-3-270m `resid_post:9` 3 of 6,000 held-out rows had ~9× the median norm and held 38%
of the variance, so a dictionary's EV and L0 are dominated by them. Harvest flags them in a
row-aligned uint8 array `tokens/massive` (rule and ratio in the store's `meta["massive"]`), so
training can weight or skip such rows:

    massive(row) = 1  if  ‖x_h(row)‖ > ratio × m_h  for any harvested hook h,  else 0

with m_h the median row norm of hook h over a **fixed reference: the planned rows of the
plan's first segment**. The reference is set by the plan alone, so every rank, every resume
and every rerun compares against the same medians and flags the same rows (a rank that does
not harvest segment 0 forwards it once for its norms; a per-segment median would change with
the segment's text, a running one with the order segments finish in). Stores without flags
(older or imported) get the same norm rule applied by evaluate.

Default ratio 3 (`MASSIVE_RATIO`), measured on Gemma-3-270m `resid_post:9` over TinyStories
(7,070 rows, see benchmarks/RESULTS.md, Harvest): ordinary rows end at 1.50× the median
(p99.9 1.46×); the 4 massive rows sit at 6.2–9.3×, with nothing in between. At `resid_post:6`
the gap is 1.75× to 4.7×. 3 is near the geometric middle of both gaps, so it flags exactly
those rows at either layer, with room on both sides for hooks whose tails are longer.

numpy and torch load inside the functions: harvest's config takes `MASSIVE_RATIO` as a default,
and `kukla --help` builds its flags from that config without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kukla.errors import KuklaError

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

    from kukla.storage import Store

MASSIVE_RATIO = 3.0
"""Default flag threshold, in multiples of the hook's reference median norm."""
MASSIVE_RULE = "norm at any hook > ratio × that hook's median norm over the planned rows of the plan's first segment"
MASSIVE = "tokens/massive"
"""The store's row-aligned massive-activation flags (uint8, 1 = massive)."""


def reference_median(norms: np.ndarray) -> np.ndarray:
    """Per-hook median row norm [hooks] of the reference rows' norms [rows, hooks]."""
    import numpy as np

    return np.median(norms, axis=0)


def massive_flags(norms: np.ndarray, median: np.ndarray, ratio: float) -> np.ndarray:
    """uint8 [rows]: 1 where a row's norm at any hook exceeds `ratio` × that hook's median."""
    import numpy as np

    return (norms > ratio * median).any(axis=1).astype(np.uint8)


def massive_ratio(store: Store) -> float:
    """The ratio the store's harvest flagged with, else the default."""
    rule = store.meta.get("massive")
    return float(rule["ratio"]) if isinstance(rule, dict) and "ratio" in rule else MASSIVE_RATIO


def has_flags(store: Store) -> bool:
    return MASSIVE in store.specs


def massive_rows(store: Store, start: int = 0, stop: int | None = None) -> Tensor:
    """Sorted indices of the rows in [start, stop) that the store flags as massive."""
    import numpy as np
    import torch

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
    import torch

    if norms.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    return norms > ratio * norms.median()
