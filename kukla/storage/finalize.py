"""finalize_store: merge every rank's part with a two-pass global shuffle under a memory budget.

Two passes (`kukla.storage.shuffle`): scatter the written rows into random buckets, then
permute each bucket into the final shards; the plan fixes both, so the same seed gives the
same store, byte for byte.

A killed finalize resumes from the units already committed, and N workers (`finalize_worker`)
can share the work: each does its own runs and shards first, then whatever nobody has
committed yet; a last `finalize_store` commits the store.
One finalize commits at a time (a lease), each worker index runs once at a time (its own
lease), and SIGTERM stops either like a kill would, minus the lease. The commit keeps `_parts/`
past its first pass while a worker's lease is live, and once every unit is committed it waits
for those workers: each has at most a duplicate unit in flight, reading `_parts/` or writing a
temporary that the commit's clean-up would otherwise remove under it. A worker that outlives
the commit anyway (stalled past its lease, or started just as the commit ended) finds the store
finalized and ends with nothing to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import zarr

from kukla.config import Bytes
from kukla.errors import KuklaError, preemption_point, stop_on_sigterm
from kukla.storage import windows
from kukla.storage.format import (TARGET_SHARD_BYTES, Attributes, HookStats, array_specs, create_array, holdout_default,
                                  write_manifest)
from kukla.storage.location import Lease, Location, disk_full_error, live_holder, remove_stale
from kukla.storage.part import SegmentTable, finished_key, unfinished_ranks
from kukla.storage.shards import Layout
from kukla.storage.shuffle import array_layouts, permute, scatter


logger = logging.getLogger(__name__)

PLAN = "_finalize/plan.json"
FINALIZE_LOCK = "_finalize.lock.json"  # beside _finalize/, which the commit removes
WORKER_LOCK = "_finalize.worker-{}.lock.json"  # one per worker index, beside the commit's


def finalize_store(path: str | Path, *, memory_budget_bytes: int = 2 << 30, seed: int = 0,
                   holdout_rows: int | None = None) -> None:
    """Shuffle all ranks' rows into the final arrays and mark the store finalized (resumable)."""
    location = Location(path)
    if _finalized(location, seed, holdout_rows):
        return
    check_memory_budget(memory_budget_bytes)
    lease = Lease(location, FINALIZE_LOCK, f"finalize of {location.url}")
    _unless_finalized(location, seed, holdout_rows, lease,
                      lambda attrs: _finalize(location, attrs, memory_budget_bytes, seed, holdout_rows, lease))


def finalize_worker(path: str | Path, worker: int, workers: int, *, memory_budget_bytes: int = 2 << 30,
                    seed: int = 0, holdout_rows: int | None = None) -> bool:
    """Worker `worker` of `workers`: its share of both passes, then any work still uncommitted.
    Run all workers at once with the same settings, then `finalize_store` to commit the store
    (it does whatever is left itself, so a lost worker costs time, never rows). True when the
    store is finalized already (a commit finished first, or meanwhile): nothing is left to do."""
    if not 0 <= worker < workers:
        raise KuklaError(f"worker {worker} is outside 0..{workers - 1}: give --worker between 0 and --workers - 1")
    location = Location(path)
    finalized = _finalized(location, seed, holdout_rows)
    if not finalized:
        check_memory_budget(memory_budget_bytes)
        lease = Lease(location, WORKER_LOCK.format(worker), f"finalize worker {worker} of {location.url}")
        finalized = _unless_finalized(location, seed, holdout_rows, lease,
                                      lambda attrs: _work(location, attrs, memory_budget_bytes, seed, holdout_rows,
                                                          worker, workers))
    if finalized:
        logger.info("finalize worker %d of %s: the store is finalized: nothing left to do", worker, location.url)
    return finalized


def _work(location: Location, attrs: Attributes, memory_budget_bytes: int, seed: int, holdout_rows: int | None,
          worker: int, workers: int) -> None:
    """A worker's share of both passes, then whatever nobody has committed yet."""
    plan = _plan(location, attrs, memory_budget_bytes, seed, holdout_rows, worker=worker)
    scatter(location, plan, worker, workers)
    permute(location, plan, worker, workers)


def _unless_finalized(location: Location, seed: int, holdout_rows: int | None, lease: Lease,
                      work: Callable[[Attributes], None]) -> bool:
    """Run `work` under `lease` unless the store is finalized; True when it is finalized by the end.
    A failure once the store is finalized is none: the commit removed what this process read, not
    waiting for it (it stalled past its lease, or took its lease just after the commit's last
    look), and marks the store finalized before it removes `_finalize/`."""
    try:
        with lease, stop_on_sigterm():
            attrs = Attributes.read(location)  # another finalize may have finished just before our lease
            if attrs.value["state"] != "finalized":
                work(attrs)
    except (FileNotFoundError, KuklaError):
        if not _finalized(location, seed, holdout_rows):
            raise
        return True
    except OSError as exc:
        raise disk_full_error(exc, location, "finalizing") or exc
    return _finalized(location, seed, holdout_rows)


def _finalized(location: Location, seed: int, holdout_rows: int | None) -> bool:
    """Whether the store is finalized (refusing other shuffle settings than its own); if so, what
    finalize leaves behind is cleared, so the store's files are the same however it was finalized."""
    attrs = Attributes.read(location).value
    if attrs["state"] != "finalized":
        return False
    check_finalized_as_asked(location, attrs, seed, holdout_rows)
    location.remove("_finalize")  # a worker that outlived the commit may have written into it again
    for key in [FINALIZE_LOCK, *_worker_leases(location)]:  # of a commit killed as it ended, of dead workers
        remove_stale(location, key)
    return True


def check_shuffle_as_asked(location: Location, seed: int, holdout_rows: int | None) -> None:
    """Refuse the shuffle settings a finalized store (its seed, its held-out rows) or a started
    finalize (its plan's seed) has already fixed otherwise, wherever a rerun meets them: every
    harvest rank, not only the one that finalizes, so no rank of a job reports success."""
    attrs = Attributes.read(location).value
    if attrs["state"] == "finalizing":
        try:
            _check_plan_seed(location, location.read_json(PLAN), seed)
            return
        except FileNotFoundError:  # committed since: the commit removes the plan after marking the store
            attrs = Attributes.read(location).value
    if attrs["state"] == "finalized":
        check_finalized_as_asked(location, attrs, seed, holdout_rows)


def _check_plan_seed(location: Location, plan: dict[str, Any], seed: int) -> None:
    if plan["seed"] != seed:
        raise KuklaError(f"finalize of {location.url} was started with seed {plan['seed']}: rerun with that seed")


def check_finalized_as_asked(location: Location, attrs: dict[str, Any], seed: int, holdout_rows: int | None) -> None:
    """Refuse a rerun whose shuffle settings differ from the finished store's: it would otherwise
    succeed as if they had been applied."""
    held_out = attrs["holdout_rows"]
    if attrs["shuffle_seed"] != seed or holdout_rows not in (None, held_out):
        raise KuklaError(f"{location.url} is already finalized with shuffle seed {attrs['shuffle_seed']} and "
                         f"{held_out} held-out rows: give those settings, or rebuild the store (--overwrite) "
                         "to change them")


def check_memory_budget(memory_budget_bytes: int) -> None:
    """Refuse a budget the shuffle cannot work in, before anything is written."""
    if memory_budget_bytes < 1 << 16:
        raise KuklaError(f"memory budget {int(memory_budget_bytes)} bytes is too small: give at least 64 KiB")


def _finalize(location: Location, attrs: Attributes, memory_budget_bytes: int, seed: int,
              holdout_rows: int | None, lease: Lease) -> None:
    plan = _plan(location, attrs, memory_budget_bytes, seed, holdout_rows, worker=None)
    scatter(location, plan, 0, 1)
    windows.write_token_ids(location, attrs.value, plan, memory_budget_bytes)  # needs _parts/
    if not _live_workers(location):  # else kept until they are done: one may be reading it for a run it duplicates
        location.remove("_parts")
    permute(location, plan, 0, 1)
    windows.write_rows(location, attrs.value, plan, memory_budget_bytes)
    _wait_for_workers(location)
    location.remove("_parts")
    location.remove_temporaries()  # a shard write killed mid-way left one beside the shard: never read, never replaced
    lease.check()  # a finalize that stalled past its lease and was taken over must not mark the store
    attrs.value.update(state="finalized", n_rows=plan["n_rows"], shuffle_seed=plan["seed"],
                       shuffle_buckets=plan["n_buckets"],
                       holdout_rows=plan["holdout_rows"] if holdout_rows is None else holdout_rows,
                       hook_stats=plan["hook_stats"], truth=plan["truth"],
                       **({"n_windows": plan["n_windows"]} if plan["n_windows"] else {}))
    attrs.write()  # then `_finalized` clears `_finalize/`: a worker that finds it gone knows the store is done


def _wait_for_workers(location: Location) -> None:
    """Wait while a worker's lease is live. Every unit is committed by now, so such a worker has at
    most a duplicate unit in flight: removing `_parts/` or the temporaries would fail it, and its
    commit record would land in the finished store. A dead worker's lease holds the commit until it expires."""
    workers = _live_workers(location)
    if workers:
        logger.info("finalize of %s: every unit is done; waiting for finalize worker %s to finish the one it is "
                    "writing (a dead worker's lease expires after KUKLA_LEASE_SECONDS, default 60)", location.url,
                    ", ".join(workers))
    while workers:
        time.sleep(0.5)
        preemption_point()
        workers = _live_workers(location)


def _live_workers(location: Location) -> list[str]:
    """The indices of the finalize workers whose leases are live."""
    prefix, _, suffix = WORKER_LOCK.partition("{}")
    return [key[len(prefix):-len(suffix)] for key in _worker_leases(location) if live_holder(location, key) is not None]


def _worker_leases(location: Location) -> list[str]:
    """The finalize workers' lease files, live or left by dead workers."""
    prefix, _, suffix = WORKER_LOCK.partition("{}")
    return [name for name in location.listdir("") if name.startswith(prefix) and name.endswith(suffix)]


def _plan(location: Location, attrs: Attributes, budget: int, seed: int, holdout_rows: int | None, *,
          worker: int | None) -> dict[str, Any]:
    """The shuffle's fixed parameters: made once (the first of racing workers wins) and followed
    by every worker; only a commit (`worker` None) that no worker is running with may plan anew
    for another budget."""
    value = attrs.value
    if value["state"] == "finalizing":
        followed = _follow(location, location.read_json(PLAN), seed, budget, worker)
        if followed is not None:
            return followed
    plan = _new_plan(location, value, budget, seed, holdout_rows)
    if value["state"] == "finalizing":
        location.put_json(PLAN, plan)
    elif not location.create(PLAN, json.dumps(plan, sort_keys=True).encode()):
        planned = location.read_json(PLAN)  # another worker planned first (or one killed before marking the store)
        if planned["id"] != plan["id"]:
            followed = _follow(location, planned, seed, budget, worker)
            if followed is None:  # this commit plans anew
                location.put_json(PLAN, plan)
            else:
                plan = followed
    _create_arrays(location, {**value, "truth": plan["truth"]}, plan)
    if Attributes.read(location).value["state"] == "finalized":  # this process stalled while a commit ended
        raise KuklaError(f"finalize of {location.url}: the store was finalized meanwhile")
    value.update(state="finalizing", truth=plan["truth"])
    attrs.write()
    return json.loads(json.dumps(plan, sort_keys=True))  # as a resumed finalize reads it back: same store bytes


def _follow(location: Location, plan: dict[str, Any], seed: int, budget: int,
            worker: int | None) -> dict[str, Any] | None:
    """The plan a finalize already made, to follow; None when this commit plans anew for its own
    budget (pass 1 not done, and no worker running the old plan, whose shards would mix with the new)."""
    _check_plan_seed(location, plan, seed)
    started_with = plan.get("memory_budget", budget)
    if started_with == budget:
        return plan
    if not location.exists("_parts"):  # pass 1 is done and its runs hold the rows: they fix the plan
        logger.warning("finalize of %s resumes the plan it started with a %s memory budget, not %s: its first "
                       "pass is done", location.url, Bytes(started_with), Bytes(budget))
        return plan
    workers = [index for index in _live_workers(location) if index != str(worker)]
    if worker is None and not workers:
        logger.info("finalize of %s: a new plan for the %s memory budget (it started with %s)",
                    location.url, Bytes(budget), Bytes(started_with))
        return None
    running = "" if not workers else (f" and finalize worker{'s' * (len(workers) > 1)} {', '.join(workers)} "
                                       f"{'are' if len(workers) > 1 else 'is'} running it")
    raise KuklaError(f"finalize of {location.url} is planned for a {Bytes(started_with)} memory budget{running}: "
                     f"give every worker and the commit --memory-budget {Bytes(started_with)} (a commit with no "
                     "worker running may plan anew for another)")


def _new_plan(location: Location, value: dict[str, Any], budget: int, seed: int,
              holdout_rows: int | None) -> dict[str, Any]:
    """A plan from every rank's journal, and the manifest of its segments."""
    world = value["world"]
    unfinished = unfinished_ranks(location)
    if unfinished:
        raise KuklaError(f"rank {unfinished[0]} of {world} has not finished writing {location.url}: rerun that "
                         "rank's job (it resumes from its journal) before finalizing")
    entries = SegmentTable.read(location, world, value["codec"]).entries  # every journal, read once
    _check_parts_whole(location, world, entries)
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
    n_rows = sum(int(e["rows"]) for e in entries)
    if holdout_rows is not None and not 0 <= holdout_rows < n_rows:
        raise KuklaError(f"holdout_rows {holdout_rows} must leave training rows: the store has {n_rows} rows; "
                         f"its rows are kept: run kukla store finalize {location.url} --holdout-rows N with N "
                         "below that")
    unit = max(1, budget // (8 * row_bytes))  # bucket ≈ shard ≈ 1/8: bucket + its permutation + carry + encode
    chunk_rows = value["chunk_rows"]
    widest = max(spec.row_bytes for spec in specs)
    shard_rows = max(chunk_rows, min(unit, TARGET_SHARD_BYTES // widest) // chunk_rows * chunk_rows)
    plan = {
        "seed": seed, "memory_budget": budget, "n_rows": n_rows, "truth": truth,
        "n_windows": windows.planned_windows(entries, location.url),
        # a run and its sorted copy (plus decoded segments) stay within the budget
        "run_rows": max(1, budget // (4 * row_bytes)), "n_buckets": max(1, math.ceil(n_rows / unit)),
        "shard_rows": shard_rows, "holdout_rows": holdout_default(n_rows) if holdout_rows is None else holdout_rows,
        "hook_stats": {hook: s.summary(value["hooks"][hook]) for hook, s in stats.items()},
    }
    plan["id"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    return plan


def _check_parts_whole(location: Location, world: int, entries: list[dict[str, Any]]) -> None:
    """Refuse to plan from parts a finalize removed while this process read them (it saw the store
    unfinalized, then stalled past its lease): planned from fewer segments than the ranks finished
    with, it wrote an empty manifest and empty arrays over the finished store's."""
    counts = Counter(int(e["rank"]) for e in entries)
    for rank in range(world):
        try:
            whole = location.read_json(finished_key(rank))["segments"] == counts[rank]
        except FileNotFoundError:
            whole = False
        if not whole:
            raise KuklaError(f"finalize of {location.url}: rank {rank}'s part was removed as this process read it "
                             "(another finalize is past its first pass): rerun to follow that finalize's plan")


def _create_arrays(location: Location, attrs: dict[str, Any], plan: dict[str, Any]) -> None:
    """The final arrays' metadata (zarr.json), made once: an array already laid out as planned is
    kept, so a worker arriving late never wipes shards another one wrote."""
    group = zarr.open_group(location.zarr_store(), mode="a")
    for layout in array_layouts(attrs, plan):
        for attempt in range(3):
            try:
                if Layout.from_metadata(location, layout.spec) == layout:
                    break
            except KuklaError:
                pass
            try:
                create_array(group, layout.spec, layout.n_rows, layout.chunk_rows, layout.shard_rows, attrs["codec"])
                break
            except FileNotFoundError:  # workers started together: another's overwrite took what this one wrote
                if attempt == 2:
                    raise
