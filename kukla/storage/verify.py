"""`kukla store info` and `kukla store verify`: what a store holds, and whether all of it decodes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kukla.errors import KuklaError
from kukla.progress import progress
from kukla.storage.format import open_array, read_blob, segment_dir
from kukla.storage.store import Store, open_store

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
    }


def verify_store(path: str | Path) -> list[str]:
    """Decode every chunk, check every count, each array's zarr.json against the store's attributes,
    each static array's checksum, and that no activation row is NaN/inf; returns the problems found."""
    store = open_store(path, allow_unfinalized=True)
    if not store.finalized:
        return _verify_segments(store)
    problems = _check_manifest(store)
    total = store.n_rows * len(store.specs)
    group = zarr.open_group(store.location.zarr_store(read_only=True), mode="r")
    with progress(total, "verify", unit="row") as bar:
        for name, spec in store.specs.items():
            try:
                open_array(group, spec, store.n_rows, store.chunk_rows, store.url)
            except KuklaError as exc:
                problems.append(str(exc))
                continue
            step = max(store.chunk_rows, READ_BYTES // max(1, spec.row_bytes) // store.chunk_rows * store.chunk_rows)
            for start in range(0, store.n_rows, step):
                problems += _decode(store, name, start, min(store.n_rows, start + step))
                bar.update(min(store.n_rows, start + step) - start)
    for name, spec in store.window_specs.items():  # windows/*: every chunk decodes, as a reader reads it
        step = max(1, READ_BYTES // spec.row_bytes)
        for start in range(0, store.n_windows, step):
            try:
                store.read_stored(name, start, start + step)
            except KuklaError as exc:
                problems.append(str(exc))
                break
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
    for entry in table.entries:
        for name, info in entry["arrays"].items():
            key = f"{segment_dir(entry['rank'], entry['segment'])}/{name}.bin"
            try:
                data = read_blob(store.location, key, info, table.codec)
                if data.shape[0] != entry["rows"]:
                    raise ValueError(f"{data.shape[0]} rows, journal says {entry['rows']}")
            except Exception as exc:  # noqa: BLE001
                problems.append(f"rank {entry['rank']} segment {entry['segment']} {name}: {exc}")
    return problems
