"""Massive-activation flags (`tokens/massive`), so training can weight or skip such rows.

A handful of tokens carry a residual norm many times the median (Gemma-3-270m: a few rows
in thousands at ~9×) and can hold a third of the variance a dictionary is scored on. The
store keeps them, flagged:

    massive(row) = 1  if  ‖x_h(row)‖ > ratio × m_h  for any harvested hook h,  else 0

with m_h the median row norm of hook h over a **fixed reference: the planned rows of the
plan's first segment**. The reference is set by the plan alone, so every rank, every resume
and every rerun compares against the same medians and flags the same rows (a rank that does
not harvest segment 0 forwards it once for its norms; a per-segment median would change with
the segment's text, a running one with the order segments finish in).

Default ratio 3 (`MASSIVE_RATIO`), measured on Gemma-3-270m `resid_post:9` over TinyStories
(7,070 rows, see benchmarks/RESULTS.md, Harvest): ordinary rows end at 1.50× the median
(p99.9 1.46×); the 4 massive rows sit at 6.2–9.3×, with nothing in between. At `resid_post:6`
the gap is 1.75× to 4.7×. 3 is near the geometric middle of both gaps, so it flags exactly
those rows at either layer, with room on both sides for hooks whose tails are longer.
"""

from __future__ import annotations

import numpy as np

MASSIVE_RATIO = 3.0
"""Default flag threshold, in multiples of the hook's reference median norm."""
MASSIVE_RULE = "norm at any hook > ratio × that hook's median norm over the planned rows of the plan's first segment"


def reference_median(norms: np.ndarray) -> np.ndarray:
    """Per-hook median row norm [hooks] of the reference rows' norms [rows, hooks]."""
    return np.median(norms, axis=0)


def massive_flags(norms: np.ndarray, median: np.ndarray, ratio: float) -> np.ndarray:
    """uint8 [rows]: 1 where a row's norm at any hook exceeds `ratio` × that hook's median."""
    return (norms > ratio * median).any(axis=1).astype(np.uint8)
