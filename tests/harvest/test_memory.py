"""A harvest's memory does not grow with the store: what it keeps per segment is an id, not the segment.

(Peak RSS per stage against the store's rows is measured by benchmarks/memory_scaling.py; these
tests pin the structures behind its figures without timing or RSS asserts.)
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from kukla.pipeline.harvest import HarvestConfig, harvest
from kukla.pipeline.harvest import run
from kukla.pipeline.text import Window
from kukla.storage import StoreWriter


def test_a_harvest_holds_the_windows_of_a_few_segments_whatever_its_length(config_model, long_texts: Path,
                                                                           tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each segment carries its windows (token ids and masks, ~16 bytes a stored row): kept for every
    segment the rank owns, they would grow with the store until the harvest ends. Counted at every
    commit, the live windows are those of the segments in flight and the first (the massive reference)."""
    live: list[int] = []
    submit = run.SegmentCommitter.submit

    def counting(self: run.SegmentCommitter, segment: int, rows) -> None:
        live.append(sum(type(o) is Window for o in gc.get_objects()))
        submit(self, segment, rows)

    monkeypatch.setattr(run.SegmentCommitter, "submit", counting)
    harvest(HarvestConfig(output=str(tmp_path / "s.zarr"), dataset=str(long_texts), hook=["resid_post:0"],
                          context_size=24, tokens=3000, segment_windows=2, store_dtype="float32"), model=config_model)
    assert len(live) > 60  # segments of 2 windows: kept, they would reach ~130 windows by the end
    assert max(live) <= 6 * 2, live  # six segments' worth, whatever the harvest's length


def test_a_harvest_finalizes_with_its_writer_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finalize reads every rank's journal itself (~6 KB a segment): a writer still alive there would
    add its own record of the rank's segments, and whatever else a later writer keeps."""
    writers: list[int] = []
    finalize = run.finalize_store

    def counting(*args, **kwargs) -> None:
        writers.append(sum(type(o) is StoreWriter for o in gc.get_objects()))
        finalize(*args, **kwargs)

    monkeypatch.setattr(run, "finalize_store", counting)
    harvest(HarvestConfig(output=str(tmp_path / "s.zarr"), source="toy-tree", tokens=3000, segment_windows=4))
    assert writers == [0]
