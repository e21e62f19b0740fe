"""`kukla store info` and `kukla store verify`: what a store holds, and whether all of it decodes."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kukla.errors import KuklaError
from kukla.progress import progress
from kukla.storage.format import open_array, shard_key
from kukla.storage.parts import read_blob, segment_dir
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
                array = open_array(group, spec, store.n_rows, store.chunk_rows, store.url)
            except KuklaError as exc:
                problems.append(str(exc))
                continue
            problems += _missing_shards(store, name, array)
            step = max(store.chunk_rows, READ_BYTES // max(1, spec.row_bytes) // store.chunk_rows * store.chunk_rows)
            for start in range(0, store.n_rows, step):
                problems += _decode(store, array, name, start, min(store.n_rows, start + step))
                bar.update(min(store.n_rows, start + step) - start)
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


def _decode(store: Store, array: Any, name: str, start: int, stop: int) -> list[str]:
    """Rows [start, stop) of one array; on failure, find the exact chunks that do not decode."""
    try:
        return _nonfinite_rows(name, array[start:stop], start)
    except Exception:  # noqa: BLE001
        pass
    problems = []
    for lo in range(start, stop, store.chunk_rows):
        hi = min(stop, lo + store.chunk_rows)
        try:
            array[lo:hi]
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{name} rows {lo}-{hi - 1}: chunk does not decode ({type(exc).__name__}: "
                            f"{str(exc)[:80]}): the shard file under {store.location.join(name, 'c')} is damaged; "
                            "restore it from a copy, or rebuild the store")
    return problems


def _missing_shards(store: Store, name: str, array: Any) -> list[str]:
    """Zarr reads a missing shard as zeros, so look for every shard file instead."""
    shard_rows = array.shards[0] if array.shards else array.chunks[0]
    expected = math.ceil(store.n_rows / shard_rows)
    folder = store.location.join(name, "c")
    present = set(store.location.fs.find(folder)) if store.location.exists(f"{name}/c") else set()
    spec = store.specs[name]
    missing = [i for i in range(expected) if store.location.join(shard_key(spec, i)) not in present]
    return [f"{name}: shard {i} (rows {i * shard_rows}-{min(store.n_rows, (i + 1) * shard_rows) - 1}) is missing: "
            "restore it from a copy, or rebuild the store" for i in missing]


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
