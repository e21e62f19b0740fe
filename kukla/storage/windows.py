"""The windows a store's rows come from, so a reader needs nothing but the store to show a row in context.

`windows/token_id` [n_windows, context_size] holds every token of window w (the rows'
`tokens/sequence` value), stored or not (BOS, separators, pads); `windows/row` holds the final
row of each position, −1 where no row holds it: a row's context and the rows of its context
tokens are then two lookups, not a scan of the shuffled store.

Finalize writes both in the committing process, from what every worker agrees on, so a split
finalize gives the same bytes as one process: token ids from the segments (before `_parts/` is
deleted; committed by `_finalize/windows.json`), rows from the final `tokens/sequence` and
`tokens/position` once pass 2 is done. Each is built in slabs of whole windows within half the
memory budget, the rows slab by one scan of those two arrays per slab (read 2²⁰ rows at a time,
fewer under a small budget: their scratch stays within a quarter of it): one scan for a store
of up to budget/16 rows, 8 of them for 10⁹ rows under the default 2 GiB budget.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from kukla.errors import KuklaError, preemption_point
from kukla.progress import progress
from kukla.storage.format import TARGET_SHARD_BYTES, WINDOW_ARRAYS, ArraySpec, create_array, numcodecs_codec, shard_key
from kukla.storage.location import Location
from kukla.storage.part import SegmentTable, read_blob, segment_dir
from kukla.storage.shards import Layout, ShardReader, encode_shard

TOKENS_DONE = "_finalize/windows.json"
WINDOW_CHUNK_BYTES = 64 << 10
SCAN_ROWS = 1 << 20
SCAN_ROW_BYTES = 48
"""Scratch a scanned row costs `write_rows` at its peak (its sequence and position, the masks and
indices of the rows in the slab, the duplicate check's keys): 45 MB for a 2²⁰-row read."""


def planned_windows(entries: list[dict[str, Any]], url: str) -> int | None:
    """n_windows (the largest window id + 1) when every segment gave windows, None when none did."""
    given = [e.get("windows") is not None for e in entries]
    if not any(given):
        return None
    if not all(given):
        raise KuklaError(f"{url}: some segments carry windows and others do not: rewrite the store")
    return max(int(e["windows"]["last"]) for e in entries) + 1


def _layouts(attrs: dict[str, Any], n_windows: int, budget: int) -> list[Layout]:
    """windows/* geometry: chunks of ~64 KiB of windows/row (a reader looks windows up one by one,
    and a small store pays for one padded chunk), shards of at most 256 MiB and budget/2."""
    width = int(attrs["context_size"])
    row_bytes = width * WINDOW_ARRAYS["windows/row"].itemsize
    chunk = 1 << max(0, (WINDOW_CHUNK_BYTES // row_bytes).bit_length() - 1)
    shard = max(chunk, min(budget // 2, TARGET_SHARD_BYTES) // row_bytes // chunk * chunk)
    codec = numcodecs_codec(attrs["codec"])
    return [Layout(ArraySpec(name, (width,), dtype), n_windows, chunk, shard, codec)
            for name, dtype in WINDOW_ARRAYS.items()]


def _create(location: Location, attrs: dict[str, Any], layout: Layout) -> None:
    group = zarr.open_group(location.zarr_store(), mode="a")
    create_array(group, layout.spec, layout.n_rows, layout.chunk_rows, layout.shard_rows, attrs["codec"])


def write_token_ids(location: Location, attrs: dict[str, Any], plan: dict[str, Any], budget: int) -> None:
    """windows/token_id from the segments' windows (−1 for an id no segment gave); once per plan."""
    n_windows = plan.get("n_windows")
    if not n_windows or (location.exists(TOKENS_DONE) and location.read_json(TOKENS_DONE).get("plan") == plan["id"]):
        return
    layout = _layouts(attrs, n_windows, budget)[0]
    _create(location, attrs, layout)
    table = SegmentTable.read(location, attrs["world"], attrs["codec"])
    with progress(n_windows, "windows 1/2 token ids", unit="window") as bar:
        for s in range(layout.n_shards):
            preemption_point()
            lo, hi = layout.shard_range(s)
            slab = _token_id_slab(location, table, layout.spec.row_shape[0], lo, hi)
            location.put_bytes(shard_key(layout.spec, s), encode_shard(layout, slab))
            bar.update(hi - lo)
    location.put_json(TOKENS_DONE, {"plan": plan["id"]})


def _token_id_slab(location: Location, table: SegmentTable, width: int, lo: int, hi: int) -> np.ndarray:
    """windows/token_id of windows [lo, hi), from the segments that hold them (−1 where none does)."""
    slab, seen = np.full((hi - lo, width), -1, np.int32), np.zeros(hi - lo, bool)
    for entry in table.entries:
        info = entry["windows"]
        if info["last"] < lo or info["first"] >= hi:
            continue
        seq, ids = (read_blob(location, f"{segment_dir(int(entry['rank']), int(entry['segment']))}/{name}.bin",
                              info["arrays"][name], table.codec) for name in ("windows/sequence", "windows/token_id"))
        mine = (seq >= lo) & (seq < hi)
        at = seq[mine] - lo
        if seen[at].any() or len(np.unique(at)) != len(at):
            raise KuklaError(f"{location.url}: window {lo + int(at[0])} (or another of segment "
                             f"{entry['segment']}) is given twice: each window id once; rewrite the store")
        seen[at], slab[at] = True, ids[mine]
    return slab


def write_rows(location: Location, attrs: dict[str, Any], plan: dict[str, Any], budget: int) -> None:
    """windows/row, the inverse of the shuffle: row i sits at [sequence(i), position(i)]; −1 elsewhere."""
    n_windows = plan.get("n_windows")
    if not n_windows:
        return
    layout = _layouts(attrs, n_windows, budget)[1]
    _create(location, attrs, layout)
    n_rows, width = plan["n_rows"], layout.spec.row_shape[0]
    readers = {name: ShardReader(location, Layout.from_metadata(location, ArraySpec(name, (), np.dtype(dtype))))
               for name, dtype in (("tokens/sequence", np.int64), ("tokens/position", np.int32))}
    per = max(1, budget // 2 // (layout.shard_rows * layout.spec.row_bytes))  # shards per slab
    scan = max(1024, min(SCAN_ROWS, budget // 4 // SCAN_ROW_BYTES))  # a read's scratch: within budget/4
    slabs = range(0, layout.n_shards, per)
    with progress(len(slabs) * n_rows, "windows 2/2 rows") as bar:  # each slab scans every row
        for first in slabs:
            preemption_point()
            shards = range(first, min(layout.n_shards, first + per))
            lo, hi = layout.shard_range(shards[0])[0], layout.shard_range(shards[-1])[1]
            slab = _row_slab(location, readers, n_rows, n_windows, width, lo, hi, scan, first == 0, bar)
            for s in shards:
                a, b = layout.shard_range(s)
                location.put_bytes(shard_key(layout.spec, s), encode_shard(layout, slab[a - lo:b - lo]))


def _row_slab(location: Location, readers: dict[str, ShardReader], n_rows: int, n_windows: int, width: int,
              lo: int, hi: int, scan: int, check: bool, bar: Any) -> np.ndarray:
    """windows/row of windows [lo, hi), from one scan of every row's sequence and position (−1: no
    row), read `scan` rows at a time."""
    slab = np.full((hi - lo, width), -1, np.int64)
    for start in range(0, n_rows, scan):
        stop = min(n_rows, start + scan)
        seq, pos = np.empty(stop - start, np.int64), np.empty(stop - start, np.int32)
        readers["tokens/sequence"].read_into(start, stop, seq)
        readers["tokens/position"].read_into(start, stop, pos)
        if check:
            _check_rows(location, seq, pos, start, n_windows, width)
        mine = np.flatnonzero((seq >= lo) & (seq < hi))
        w, p = seq[mine] - lo, pos[mine]
        if (slab[w, p] >= 0).any() or len(np.unique(w * width + p)) != len(w):
            raise KuklaError(f"{location.url}: two rows claim the same window position in windows "
                             f"{lo}-{hi - 1}: each (sequence, position) once; rewrite the store")
        slab[w, p] = start + mine
        bar.update(stop - start)
    return slab


def _check_rows(location: Location, seq: np.ndarray, pos: np.ndarray, start: int, n_windows: int, width: int) -> None:
    """Every row must sit in a given window, at a position inside it."""
    bad = np.flatnonzero((seq < 0) | (seq >= n_windows) | (pos < 0) | (pos >= width))
    if len(bad):
        i = int(bad[0])
        raise KuklaError(f"{location.url}: row {start + i} has sequence {int(seq[i])}, position "
                         f"{int(pos[i])}, outside the {n_windows} windows of {width} tokens given: give each row's "
                         "window and position, or no windows")
