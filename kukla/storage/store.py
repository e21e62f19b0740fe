"""Reading a kukla store: `open_store` and `Store` (metadata, random-access reads), and checking it.

A finalized store's row-aligned arrays are read straight from their shards (`shards.py`), so
a missing or damaged chunk is refused with a one-line error instead of reading as zeros.
`store_info` and `verify_store` (`kukla store info / verify`) say what a store holds and whether
all of it decodes, through the same reader train and evaluate use.

A store being written can be read (for inspection) with allow_unfinalized=True: its rows are
then the committed segments in (rank, segment) order, unshuffled.
"""

from __future__ import annotations

import hashlib
import io
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from kukla.config import torch_dtype
from kukla.errors import KuklaError
from kukla.progress import progress
from kukla.storage.format import (ArraySpec, Attributes, HookStats, array_specs, data_crc32, from_stored, open_array,
                                  window_specs)
from kukla.storage.location import Location
from kukla.storage.part import SegmentTable, read_blob, read_journal, segment_dir, unfinished_ranks
from kukla.storage.shards import Layout, ShardReader


class Store:
    """A kukla store opened for reading; `read` hides the bf16-as-uint16 storage."""

    def __init__(self, location: Location, attrs: dict[str, Any]) -> None:
        self.location = location
        self.meta: dict[str, Any] = attrs
        self.finalized = attrs["state"] == "finalized"
        self.specs: dict[str, ArraySpec] = {spec.name: spec for spec in array_specs(attrs)}
        self.window_specs: dict[str, ArraySpec] = {spec.name: spec for spec in window_specs(attrs)}
        """windows/token_id and windows/row ([n_windows, context_size]) where the writer gave windows."""
        self.n_windows: int = int(attrs.get("n_windows") or 0)
        self._readers: dict[str, ShardReader] = {}
        if self.finalized:
            self._group = zarr.open_group(location.zarr_store(read_only=True), mode="r")
            self.n_rows: int = int(attrs["n_rows"])
            self.holdout_rows: int = int(attrs["holdout_rows"])
            self.segments = None
        else:
            self.segments = SegmentTable.read(location, attrs["world"], attrs["codec"])
            self.n_rows = self.segments.n_rows
            self.holdout_rows = 0
            self._group = None

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def hooks(self) -> dict[str, int]:
        """Hook name -> width, in the order the store lists them."""
        return dict(self.meta["hooks"])

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.meta["dtype"])

    @property
    def chunk_rows(self) -> int:
        return int(self.meta["chunk_rows"])

    @property
    def context_size(self) -> int | None:
        """Tokens per window (`context_size`; stores before format 1's windows kept it under
        `harvest`), None for rows not from windows (imports without tokens)."""
        value = self.meta.get("context_size", (self.meta.get("harvest") or {}).get("context_size"))
        return None if value is None else int(value)

    @cached_property
    def window_chunk_rows(self) -> int:
        """Windows per chunk of windows/* (what reading one window costs)."""
        return Layout.from_metadata(self.location, self.window_specs["windows/row"]).chunk_rows

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def where(self) -> dict[str, str]:
        """The paths the run read its local inputs by (a harvest's `model` folder and `dataset` file,
        as far as they were local; an import's file per hook and `tokens`), on the host that wrote
        the store first: not part of the fingerprint, so the inputs may be mounted elsewhere."""
        return dict(self.meta.get("where") or {})

    @property
    def identity(self) -> dict[str, Any]:
        """What fixes row i's content: the run (fingerprint), its shuffle and split, and the data's
        sums (two stores of one meta, e.g. imports, differ there). A moved copy keeps it."""
        return {key: self.meta.get(key) for key in ("fingerprint", "dtype", "n_rows", "holdout_rows", "shuffle_seed",
                                                     "shuffle_buckets", "hook_stats")}

    @property
    def identity_digest(self) -> str:
        """A short hash of `identity`, which a dictionary keeps to know the store it trained on."""
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]

    def check_hooks(self, hooks: list[str] | tuple[str, ...]) -> None:
        unknown = [h for h in hooks if h not in self.meta["hooks"]]
        if unknown:
            raise KuklaError(f"hook {unknown[0]!r} is not in store {self.url}; its hooks: {', '.join(self.hooks)}")

    def hook_stats(self, name: str) -> dict[str, float]:
        """mean_norm (E‖x‖), rms_norm, max_abs, scale = √d / E‖x‖, rows."""
        self.check_hooks([name])
        if "hook_stats" in self.meta:
            return dict(self.meta["hook_stats"][name])
        stats = HookStats()
        for entry in self._journal_entries():
            stats.merge(HookStats.from_json(entry["stats"][name]))
        return stats.summary(self.hooks[name])

    def _journal_entries(self) -> list[dict[str, Any]]:
        return [e for rank in range(self.meta["world"]) for e in read_journal(self.location, rank).values()]

    def array_name(self, name: str) -> str:
        """Full array name for `name`: a bare hook name means acts/<hook>."""
        if name in self.specs or name in self.window_specs or name.startswith("static/"):
            return name
        if name in self.meta["hooks"]:
            return f"acts/{name}"
        if name.startswith("acts/"):
            self.check_hooks([name[5:]])
        raise KuklaError(f"store {self.url} has no array {name!r}; arrays: {', '.join(self.specs)}")

    def read_stored(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) as stored on disk (bf16 as uint16 bits)."""
        name = self.array_name(name)
        if name.startswith("static/"):
            group = self._group if self._group is not None else zarr.open_group(
                self.location.zarr_store(read_only=True), mode="r")
            try:
                array = group[name]
            except KeyError:
                raise KuklaError(f"store {self.url} has no array {name!r}") from None
            data = array[...]
            if "crc32" in array.attrs and data_crc32(data) != array.attrs["crc32"]:
                raise KuklaError(f"{self.url}/{name} is damaged (checksum mismatch): restore it from a copy, "
                                 "or rebuild the store; `kukla store verify` lists every damaged part")
            return data if stop is None and start == 0 else data[start:stop]
        length = self.n_windows if name in self.window_specs else self.n_rows
        stop = length if stop is None else min(stop, length)
        start = max(0, min(start, stop))
        spec = self.window_specs.get(name) or self.specs[name]
        out = np.empty((stop - start, *spec.row_shape), spec.dtype)
        self.read_into(name, start, stop, out)
        return out

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """Rows [start, stop) of a row-aligned or window-aligned array (full name) into `out`, as stored."""
        if start == stop:
            return
        if self.segments is not None:
            out[...] = self.segments.read_rows(name, start, stop)
            return
        reader = self._readers.get(name)
        if reader is None:
            # refuses this array's metadata where it disagrees with the store's attributes
            spec = self.window_specs.get(name) or self.specs[name]
            layout = Layout.from_metadata(self.location, spec)
            if name in self.window_specs:  # their own geometry: n_windows rows, chunks of whole windows
                open_array(self._group, spec, self.n_windows, layout.chunk_rows, self.url)
            else:
                open_array(self._group, spec, self.n_rows, self.chunk_rows, self.url)
            reader = ShardReader(self.location, layout)
            self._readers[name] = reader
        reader.read_into(start, stop, out)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of any row-aligned array, or a static array, as a torch tensor."""
        data = self.read_stored(name, start, stop)
        return from_stored(data, self.meta["dtype"] if self.array_name(name).startswith("acts/") else "")

    def read_rows(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """Rows of a row- or window-aligned array in the order given (repeats allowed), as `read`
        gives them. A chunk is what reading one of its rows costs, so each chunk holding some of
        them is read once: the cost follows the chunks touched, not the rows asked."""
        size = self.window_chunk_rows if self.array_name(name) in self.window_specs else self.chunk_rows
        unique, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        chunks, first = np.unique(unique // size, return_index=True)
        bounds = np.append(first, len(unique)).tolist()
        empty = self.read(name, 0, 0)
        out = empty.new_empty((len(unique), *empty.shape[1:]))
        for i, chunk in enumerate(chunks.tolist()):
            a, b = bounds[i], bounds[i + 1]
            out[a:b] = self.read(name, chunk * size, (chunk + 1) * size)[torch.from_numpy(unique[a:b] - chunk * size)]
        return out[torch.from_numpy(inverse.reshape(-1))]

    @cached_property
    def arrays(self) -> dict[str, Any]:
        """The open zarr arrays of a finalized store (opened once: each open reads metadata)."""
        assert self._group is not None
        return {name: open_array(self._group, spec, self.n_rows, self.chunk_rows, self.url)
                for name, spec in self.specs.items()}


def open_store(path: str | Path, *, allow_unfinalized: bool = False) -> Store:
    """Open a store for reading; an unfinished one is refused unless allow_unfinalized."""
    location = Location(path)
    attrs = Attributes.read(location).value
    if attrs["state"] != "finalized":
        if not allow_unfinalized or attrs["state"] == "finalizing":
            raise KuklaError(f"{location.url} is not finalized (state {attrs['state']}): run `kukla store finalize "
                             f"{location.url}` once every rank has finished writing")
    return Store(location, attrs)


READ_BYTES = 64 << 20  # verify decodes this much at a time, then narrows a failure down to chunks


def store_info(path: str | Path) -> dict[str, Any]:
    """Tokens, hooks and widths, dtype, bytes on disk, compression ratio, state."""
    store = open_store(path, allow_unfinalized=True)
    raw = sum(store.n_rows * spec.row_bytes for spec in store.specs.values())
    on_disk = store.location.disk_usage()
    return {
        "path": store.url, "state": store.meta["state"], "finalized": store.finalized, "tokens": store.n_rows,
        "holdout_rows": store.holdout_rows, "hooks": store.hooks, "dtype": store.meta["dtype"],
        "codec": store.meta["codec"], "bytes_on_disk": on_disk, "bytes_uncompressed": raw,
        "compression_ratio": raw / on_disk if on_disk else None, "world": store.meta["world"],
        "shuffle_seed": store.meta.get("shuffle_seed"), "model": store.meta.get("model"),
        "source": store.meta.get("source"), "kukla_version": store.meta["kukla_version"],
        "windows": store.n_windows if store.finalized else None, "context_size": store.context_size,
        "mean_norm": {hook: store.hook_stats(hook)["mean_norm"] for hook in store.hooks},
        "unfinished_ranks": unfinished_ranks(store.location),
    }


def verify_store(path: str | Path) -> list[str]:
    """Decode every chunk, check every count, each array's zarr.json against the store's attributes,
    each static array's checksum, and that no activation row is NaN/inf; returns the problems found."""
    store = open_store(path, allow_unfinalized=True)
    if not store.finalized:
        return _verify_segments(store)
    problems = _check_manifest(store)
    total = (store.n_rows * sum(spec.row_bytes for spec in store.specs.values())
             + store.n_windows * sum(spec.row_bytes for spec in store.window_specs.values()))
    group = zarr.open_group(store.location.zarr_store(read_only=True), mode="r")
    with progress(total, "verify", unit="B") as bar:  # decoded bytes: each array's rows weigh what they hold
        for name, spec in store.specs.items():
            try:
                open_array(group, spec, store.n_rows, store.chunk_rows, store.url)
            except KuklaError as exc:
                problems.append(str(exc))
                continue
            step = max(store.chunk_rows, READ_BYTES // max(1, spec.row_bytes) // store.chunk_rows * store.chunk_rows)
            for start in range(0, store.n_rows, step):
                problems += _decode(store, name, start, min(store.n_rows, start + step))
                bar.update((min(store.n_rows, start + step) - start) * spec.row_bytes)
        for name, spec in store.window_specs.items():  # windows/*: every chunk decodes, as a reader reads it
            step = max(1, READ_BYTES // spec.row_bytes)
            for start in range(0, store.n_windows, step):
                try:
                    store.read_stored(name, start, start + step)
                except KuklaError as exc:
                    problems.append(str(exc))
                    break
                bar.update((min(store.n_windows, start + step) - start) * spec.row_bytes)
    for name in _static_names(store):
        try:
            store.read_stored(name)
        except Exception as exc:  # noqa: BLE001 - any failure to decode is what we report
            problems.append(f"{name} does not decode ({type(exc).__name__}: {exc}): restore it or rewrite the store")
    return problems


def _nonfinite_rows(name: str, data: np.ndarray, start: int) -> list[str]:
    """Activation rows holding NaN or inf (harvest and import refuse them; damage or another tool does not)."""
    if not name.startswith("acts/"):
        return []
    if data.dtype == np.uint16:  # bf16 bits: exponent all ones
        bad = ((data & 0x7F80) == 0x7F80).any(axis=1)
    else:
        bad = ~np.isfinite(data).all(axis=1)
    rows = start + np.flatnonzero(bad)
    if not len(rows):
        return []
    listed = ", ".join(map(str, rows[:5].tolist())) + (", ..." if len(rows) > 5 else "")
    return [f"{name}: {len(rows)} row(s) hold NaN or inf (rows {listed}): rebuild the store from finite "
            "activations (import --drop-nonfinite drops such rows)"]


def _decode(store: Store, name: str, start: int, stop: int) -> list[str]:
    """Rows [start, stop) of one array through the store's own reader, the one train and evaluate
    use (so a missing shard, a chunk absent from its index or a checksum mismatch is found here
    exactly when a reader would refuse it); on failure, every chunk it refuses, in its words."""
    try:
        return _nonfinite_rows(name, store.read_stored(name, start, stop), start)
    except KuklaError:
        pass
    problems: dict[str, None] = {}  # a missing shard fails each of its chunks with one message
    for lo in range(start, stop, store.chunk_rows):
        try:
            store.read_stored(name, lo, min(stop, lo + store.chunk_rows))
        except KuklaError as exc:
            problems[str(exc).replace(f"run `kukla store verify {store.url}` and restore or rebuild it",
                                      "restore it from a copy, or rebuild the store")] = None
    return list(problems)


def _check_manifest(store: Store) -> list[str]:
    if not store.location.exists("manifest.parquet"):
        return ["manifest.parquet is missing: the store was not finalized by kukla; rebuild it"]
    import pyarrow.parquet as pq

    with store.location.fs.open(store.location.join("manifest.parquet"), "rb") as f:
        manifest = pq.read_table(io.BytesIO(f.read()))
    rows = int(np.sum(manifest["rows"].to_numpy())) if manifest.num_rows else 0
    if rows != store.n_rows:
        return [f"manifest.parquet lists {rows} rows but the store holds {store.n_rows}: rows were lost or "
                "duplicated; rebuild the store"]
    return []


def _static_names(store: Store) -> list[str]:
    return [f"static/{name}" for name in store.location.listdir("static") if name != "zarr.json"]


def _verify_segments(store: Store) -> list[str]:
    """A store being written: every committed segment decodes and has its journal's row count."""
    problems = []
    table = store.segments
    with progress(sum(int(e["rows"]) for e in table.entries), "verify (segments)") as bar:
        for entry in table.entries:
            for name, info in entry["arrays"].items():
                key = f"{segment_dir(entry['rank'], entry['segment'])}/{name}.bin"
                try:
                    data = read_blob(store.location, key, info, table.codec)
                    if data.shape[0] != entry["rows"]:
                        raise ValueError(f"{data.shape[0]} rows, journal says {entry['rows']}")
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"rank {entry['rank']} segment {entry['segment']} {name}: {exc}")
            bar.update(int(entry["rows"]))
    return problems
