"""finalize_store: merge every rank's part with a two-pass global shuffle under a memory budget.

Pass 1 (scatter) reads the written rows in runs that fit the budget, sends each row to a
uniformly random bucket, and writes each run sorted by bucket (raw bytes, one file per
array), so a bucket's rows are one byte range per run. Pass 2 (permute) loads one bucket at
a time, permutes it uniformly, and appends it to the final arrays. Random buckets and a
uniform permutation inside each give a uniform permutation of all rows; the same seed gives
the same store.

Every step is deterministic and committed by one small object, so a killed finalize resumes:
runs are skipped once committed, and pass 2 writes only whole shards, recording the rows
flushed; on resume it regenerates the bucket holding that row and carries on from it.
One finalize runs at a time (a lease), and SIGTERM stops it like a kill would, minus the lease.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kukla.errors import KuklaError
from kukla.preempt import stop_on_sigterm
from kukla.progress import progress
from kukla.storage.format import (TARGET_SHARD_BYTES, Attributes, ArraySpec, HookStats, array_specs, create_array,
                                  holdout_default, shard_key, write_manifest)
from kukla.storage.lease import Lease
from kukla.storage.location import Location, disk_full_error
from kukla.storage.parts import SegmentTable, finished_key, read_journal

PLAN = "_finalize/plan.json"
FINALIZE_LOCK = "_finalize.lock.json"  # beside _finalize/, which a fresh plan clears


def finalize_store(path: str | Path, *, memory_budget_bytes: int = 2 << 30, seed: int = 0,
                   holdout_rows: int | None = None) -> None:
    """Shuffle all ranks' rows into the final arrays and mark the store finalized (resumable)."""
    location = Location(path)
    attrs = Attributes.read(location)
    if attrs.value["state"] == "finalized":
        location.remove("_finalize")
        return
    check_memory_budget(memory_budget_bytes)
    try:
        with Lease(location, FINALIZE_LOCK, f"finalize of {location.url}") as lease, stop_on_sigterm():
            attrs = Attributes.read(location)  # another finalize may have finished just before our lease
            if attrs.value["state"] != "finalized":
                _finalize(location, attrs, memory_budget_bytes, seed, holdout_rows, lease)
    except OSError as exc:
        raise disk_full_error(exc, location, "finalizing") or exc


def check_memory_budget(memory_budget_bytes: int) -> None:
    """Refuse a budget the shuffle cannot work in, before anything is written."""
    if memory_budget_bytes < 1 << 16:
        raise KuklaError(f"memory budget {memory_budget_bytes} bytes is too small: give at least 64 KiB")


def _finalize(location: Location, attrs: Attributes, memory_budget_bytes: int, seed: int,
              holdout_rows: int | None, lease: Lease) -> None:
    plan = _plan(location, attrs, memory_budget_bytes, seed, holdout_rows)
    _scatter(location, plan)
    _permute(location, plan)
    lease.check()  # a finalize that stalled past its lease and was taken over must not mark the store
    attrs.value.update(state="finalized", n_rows=plan["n_rows"], shuffle_seed=plan["seed"],
                       shuffle_buckets=plan["n_buckets"],
                       holdout_rows=plan["holdout_rows"] if holdout_rows is None else holdout_rows,
                       hook_stats=plan["hook_stats"], truth=plan["truth"])
    attrs.write()
    location.remove("_finalize")


def unfinished_ranks(path: str | Path | Location) -> list[int]:
    """Ranks of a store being written that have not called `finish()` yet (empty once finalized)."""
    location = path if isinstance(path, Location) else Location(path)
    attrs = Attributes.read(location).value
    if attrs["state"] != "writing":
        return []
    return [r for r in range(attrs["world"]) if not location.exists(finished_key(r))]


def _plan(location: Location, attrs: Attributes, budget: int, seed: int, holdout_rows: int | None) -> dict[str, Any]:
    """The shuffle's fixed parameters: made once, read back on resume."""
    value = attrs.value
    if value["state"] == "finalizing":
        plan = location.read_json(PLAN)
        if plan["seed"] != seed:
            raise KuklaError(f"finalize of {location.url} was started with seed {plan['seed']}: rerun with that seed")
        return plan
    world = value["world"]
    unfinished = unfinished_ranks(location)
    if unfinished:
        raise KuklaError(f"rank {unfinished[0]} of {world} has not finished writing {location.url}: rerun that "
                         "rank's job (it resumes from its journal) before finalizing")
    location.remove("_finalize")
    table = SegmentTable.read(location, world, value["codec"])
    journals = [read_journal(location, rank) for rank in range(world)]
    entries = [e for journal in journals for _, e in sorted(journal.items())]
    truth = entries[0]["truth"] if entries else []
    if any(e["truth"] != truth for e in entries):
        raise KuklaError(f"{location.url}: ranks wrote different truth arrays: rewrite the store")
    stats = {hook: HookStats() for hook in value["hooks"]}
    for entry in entries:
        for hook, summary in entry["stats"].items():
            stats[hook].merge(HookStats.from_json(summary))
    write_manifest(location, "manifest.parquet", entries)
    specs = array_specs({**value, "truth": truth})
    row_bytes = sum(spec.row_bytes for spec in specs)
    n_rows = table.n_rows
    if holdout_rows is not None and not 0 <= holdout_rows < n_rows:
        raise KuklaError(f"holdout_rows {holdout_rows} must leave training rows: the store has {n_rows} rows; "
                         "give fewer held-out rows")
    unit = max(1, budget // (8 * row_bytes))  # bucket ≈ shard ≈ 1/8: bucket + its permutation + carry + encode
    chunk_rows = value["chunk_rows"]
    widest = max(spec.row_bytes for spec in specs)
    shard_rows = max(chunk_rows, min(unit, TARGET_SHARD_BYTES // widest) // chunk_rows * chunk_rows)
    plan = {
        "seed": seed, "n_rows": n_rows, "truth": truth,
        # a run and its sorted copy (plus decoded segments) stay within the budget
        "run_rows": max(1, budget // (4 * row_bytes)), "n_buckets": max(1, math.ceil(n_rows / unit)),
        "shard_rows": shard_rows, "holdout_rows": holdout_default(n_rows) if holdout_rows is None else holdout_rows,
        "hook_stats": {hook: s.summary(value["hooks"][hook]) for hook, s in stats.items()},
    }
    location.put_json(PLAN, plan)
    value.update(state="finalizing", truth=truth)
    attrs.write()
    return plan


def _specs(attrs: dict[str, Any], plan: dict[str, Any]) -> list[ArraySpec]:
    return array_specs({**attrs, "truth": plan["truth"]})


def _run_key(k: int) -> str:
    return f"_finalize/runs/run-{k:06d}"


def _scatter(location: Location, plan: dict[str, Any]) -> None:
    """Pass 1: each run's rows, sorted by a uniformly random bucket, one raw file per array."""
    if location.exists("_finalize/scattered.json"):
        return
    attrs = Attributes.read(location).value
    table = SegmentTable.read(location, attrs["world"], attrs["codec"])
    specs, n_rows, run_rows = _specs(attrs, plan), plan["n_rows"], plan["run_rows"]
    with progress(n_rows, "shuffle 1/2 scatter") as bar:
        for k in range(math.ceil(n_rows / run_rows)):
            lo, hi = k * run_rows, min(n_rows, (k + 1) * run_rows)
            if location.exists(_run_key(k) + ".json"):
                bar.update(hi - lo)
                continue
            buckets = np.random.default_rng([plan["seed"], 1, k]).integers(0, plan["n_buckets"], hi - lo)
            order = np.argsort(buckets, kind="stable")
            for spec in specs:
                data = np.ascontiguousarray(table.read_rows(spec.name, lo, hi)[order])
                location.put_bytes(f"{_run_key(k)}/{spec.name}.bin", memoryview(data).cast("B"))
            counts = np.bincount(buckets, minlength=plan["n_buckets"])
            location.put_json(_run_key(k) + ".json", {"counts": counts.tolist()})
            bar.update(hi - lo)
    location.put_json("_finalize/scattered.json", {"runs": math.ceil(n_rows / run_rows)})
    location.remove("_parts")


def _permute(location: Location, plan: dict[str, Any]) -> None:
    """Pass 2: one bucket at a time, uniformly permuted, appended in whole shards."""
    attrs = Attributes.read(location).value
    specs, n_rows, shard_rows = _specs(attrs, plan), plan["n_rows"], plan["shard_rows"]
    group = zarr.open_group(location.zarr_store(), mode="a")
    if not location.exists("_finalize/arrays.json"):
        for spec in specs:
            create_array(group, spec, n_rows, attrs["chunk_rows"], shard_rows, attrs["codec"])
        location.put_json("_finalize/arrays.json", {"created": True})
        Attributes(location, attrs).write()  # zarr rewrote the root metadata: keep ours
    arrays = {spec.name: group[spec.name] for spec in specs}
    n_runs = math.ceil(n_rows / plan["run_rows"]) if n_rows else 0
    counts = np.array([location.read_json(_run_key(k) + ".json")["counts"] for k in range(n_runs)],
                      dtype=np.int64).reshape(n_runs, plan["n_buckets"])
    run_offsets = np.cumsum(counts, axis=1) - counts  # where bucket b starts inside run k
    bucket_end = np.cumsum(counts.sum(axis=0))
    flushed = location.read_json("_finalize/flushed.json")["rows"] if location.exists("_finalize/flushed.json") else 0
    carry: dict[str, list[np.ndarray]] = {spec.name: [] for spec in specs}
    carried = 0

    def flush(m: int) -> None:
        nonlocal flushed, carried
        for spec in specs:
            pieces = carry[spec.name]
            block = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            arrays[spec.name][flushed:flushed + m] = block[:m]
            carry[spec.name] = [block[m:]]
            for shard in range(flushed // shard_rows, (flushed + m - 1) // shard_rows + 1):
                location.make_durable(shard_key(spec, shard))
        flushed += m
        carried -= m
        location.put_json("_finalize/flushed.json", {"rows": flushed})

    first = int(np.searchsorted(bucket_end, flushed, side="right"))
    with progress(n_rows, "shuffle 2/2 permute", initial=flushed) as bar:
        for b in range(first, plan["n_buckets"]):
            size = int(counts[:, b].sum())
            perm = np.random.default_rng([plan["seed"], 2, b]).permutation(size)
            skip = flushed - int(bucket_end[b] - size) if b == first else 0
            for spec in specs:
                bucket = np.empty((size, *spec.row_shape), spec.dtype)
                flat, at = bucket.reshape(-1).view(np.uint8), 0
                for k in np.flatnonzero(counts[:, b]):
                    start = int(run_offsets[k, b]) * spec.row_bytes
                    piece = location.read_range(f"{_run_key(k)}/{spec.name}.bin", start,
                                                start + int(counts[k, b]) * spec.row_bytes)
                    flat[at:at + len(piece)] = np.frombuffer(piece, np.uint8)
                    at += len(piece)
                carry[spec.name].append(bucket[perm[skip:]])
            carried += size - skip
            while carried >= shard_rows:
                flush(shard_rows)
                bar.update(shard_rows)
        if carried:
            bar.update(carried)
            flush(carried)
