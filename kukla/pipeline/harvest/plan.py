"""The plan: which rows a harvest stores, fixed before any forward pass.

Windows come in dataset order; consecutive runs of `segment_windows` windows form
segment 0, 1, 2, …; rank r of world w owns the segments s with s mod w = r. The token
budget is cut on the *planned* rows (kept positions, known from tokenization alone), in
window order, trimming the last window, so the cut is the same on every rank, on every
resume, and on every device. Rows dropped later as norm outliers are counted, not
replaced, so the plan never depends on floating-point results.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from kukla.pipeline.text import Window


@dataclass(frozen=True)
class Segment:
    """A committed unit of work: consecutive windows, owned by one rank."""

    id: int
    """Position in the plan; rank r of world w owns the ids with id mod w = r."""
    planned_rows: int
    """Rows the plan puts in this segment (before any outlier drop)."""
    windows: tuple[Window, ...] = ()
    """The context windows it covers (none for generated sources such as the toy tree)."""


def cut_budget(windows: Iterable[Window], tokens: int) -> Iterator[Window]:
    """Windows until `tokens` kept positions are covered; the last window's mask is trimmed."""
    left = tokens
    for window in windows:
        kept = int(window.keep.sum())
        if kept >= left:
            keep = window.keep.copy()
            keep[np.flatnonzero(keep)[left:]] = False
            yield Window(window.index, window.tokens, keep)
            return
        left -= kept
        yield window


def plan_segments(windows: Iterable[Window], segment_windows: int) -> Iterator[Segment]:
    """Group windows into segments in order (the last may be short)."""
    batch: list[Window] = []
    segment_id = 0
    for window in windows:
        batch.append(window)
        if len(batch) == segment_windows:
            yield _segment(segment_id, batch)
            segment_id, batch = segment_id + 1, []
    if batch:
        yield _segment(segment_id, batch)


def _segment(segment_id: int, windows: list[Window]) -> Segment:
    return Segment(segment_id, int(sum(w.keep.sum() for w in windows)), tuple(windows))


def owned(segment_id: int, rank: int, world: int) -> bool:
    """Whether rank `rank` of `world` harvests this segment (round-robin keeps ranks balanced)."""
    return segment_id % world == rank
