"""Split finalize with real processes: workers and the commit, in any order and at any time (a
worker still working when the commit ends, one stalled past its lease, one killed on another
host), all exit 0 and leave the store a single-process finalize writes, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kukla.errors import KuklaError
from kukla.storage import finalize_store, finalize_worker
from kukla.storage.finalize import _plan
from kukla.storage.format import Attributes
from kukla.storage.location import Location

from tests.cli import stopped, stopping_at_read

from .conftest import store_files, store_state, wait_for, write_sequences  # noqa: TID252

REPO = Path(__file__).resolve().parents[2]

SEGMENT = r"/_parts/.*\.bin$"
"""A segment's data, which pass 1 reads."""


def _start(tmp_path: Path, name: str, *args: str, stop_at: str | None = None, **env: str) -> subprocess.Popen:
    """`kukla store finalize STORE ARGS` (split, 64 KiB budget), its stdout and stderr in NAME.out
    and NAME.err; with `stop_at`, stopped just before it first reads a file matching it."""
    launch = stopping_at_read(stop_at) if stop_at else ["-m", "kukla"]
    with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, *launch, "store", "finalize", str(tmp_path / "split"),
                                 "--memory-budget", "64KiB", *args], cwd=REPO, stdout=out, stderr=err, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO), **env})
    if stop_at:
        wait_for(proc, lambda: stopped(proc))
    return proc


def _err(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.err").read_text()


def _worker(tmp_path: Path, stop_at: str | None = None, **env: str) -> subprocess.Popen:
    """Worker 1 of 2."""
    return _start(tmp_path, "worker", "--workers", "2", "--worker", "1", stop_at=stop_at, **env)


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Path, Path]:
    """tmp_path/split, written and not finalized, and the store one finalize makes of the same rows."""
    split, single = tmp_path / "split", tmp_path / "single"
    for store in (split, single):
        write_sequences(store, 200, 16)
    finalize_store(single, memory_budget_bytes=64 << 10)
    return split, single


def _array_temporaries(path: Path) -> list[Path]:
    """Temporaries of shard writes in flight, in the final arrays (not the leases' or _finalize/'s)."""
    return [p for p in path.rglob("*.tmp-*") if not p.relative_to(path).parts[0].startswith("_")]


@pytest.mark.slow
def test_the_commit_waits_for_a_live_worker_before_removing_temporaries(tmp_path: Path, stores) -> None:
    """A worker still writing (a slow duplicate of a unit the commit did itself) when the commit
    removed the arrays' temporaries lost its shard write under it and failed (FileNotFoundError)."""
    path, single = stores
    worker = _worker(tmp_path)
    try:
        deadline = time.monotonic() + 120
        while True:  # stop the worker mid-way through writing a shard: its temporary is on disk
            assert worker.poll() is None and time.monotonic() < deadline, "the worker finished before it was caught"
            if _array_temporaries(path):
                worker.send_signal(signal.SIGSTOP)
                if _array_temporaries(path):
                    break
                worker.send_signal(signal.SIGCONT)
            time.sleep(0.001)
        commit = _start(tmp_path, "commit")  # it does every unit itself, the one the worker writes too
        wait_for(commit, lambda: "waiting for finalize worker 1" in _err(tmp_path, "commit"))
    finally:
        worker.send_signal(signal.SIGCONT)
    assert worker.wait(timeout=120) == 0, _err(tmp_path, "worker")
    assert commit.wait(timeout=120) == 0, _err(tmp_path, "commit")
    assert store_state(path) == "finalized" and not _array_temporaries(path) and not (path / "_finalize").exists()
    assert store_files(path) == store_files(single)


@pytest.mark.slow
def test_a_worker_reading_the_parts_when_the_commit_has_done_every_unit_finishes_its_run(tmp_path: Path,
                                                                                       stores) -> None:
    """The commit removed _parts/ after its own first pass, under a worker still reading it for a
    run the commit had done too: the worker died with a FileNotFoundError traceback."""
    path, single = stores
    worker = _worker(tmp_path, stop_at=SEGMENT)  # it has judged its first run not done, and holds its lease
    try:
        commit = _start(tmp_path, "commit")
        wait_for(commit, lambda: "waiting for finalize worker 1" in _err(tmp_path, "commit"))
    finally:
        worker.send_signal(signal.SIGCONT)
    assert worker.wait(timeout=120) == 0, _err(tmp_path, "worker")
    assert commit.wait(timeout=120) == 0, _err(tmp_path, "commit")
    assert store_files(path) == store_files(single)


PLANNED = r"/acts/[^/]+/zarr\.json$"
"""An array's metadata, which a worker reads once it has planned, before it marks the store finalizing."""

STALLS = {
    "having planned, before marking the store": PLANNED,
    "pass 1, before reading the parts": r"/_finalize/runs/run-\d+\.json$",
    "pass 1, reading the parts": SEGMENT,
    "pass 2": r"/_finalize/shards/shard-\d+\.json$",
    "having read the state finalizing": r"/_finalize/plan\.json$",
}
"""Where a worker stops: just before it reads a run's commit, a segment, a shard's commit or the plan."""


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", STALLS.values(), ids=list(STALLS))
def test_a_worker_stalled_past_its_lease_through_the_whole_commit_ends_with_nothing_to_do(
        tmp_path: Path, stores, stop_at: str) -> None:
    """Continued once the commit had finished and removed _parts/ and _finalize/, the worker died
    with a traceback (FileNotFoundError on a segment, a run file or the plan; ValueError on the
    parts it found empty); the commit left its expired lease in the finished store."""
    path, single = stores
    if "plan" in stop_at:  # a store whose units are all done: the worker reads the plan, not the parts
        finalize_worker(path, 0, 2, memory_budget_bytes=64 << 10)
    worker = _worker(tmp_path, stop_at=stop_at, KUKLA_LEASE_SECONDS="1")
    commit = _start(tmp_path, "commit")  # it waits for the worker until the worker's lease expires
    try:
        assert commit.wait(timeout=120) == 0, _err(tmp_path, "commit")
        assert not list(path.glob("_finalize*"))  # the stopped worker's lease too: it may be dead, for all we know
    finally:
        worker.send_signal(signal.SIGCONT)
    assert worker.wait(timeout=120) == 0, _err(tmp_path, "worker")
    err = _err(tmp_path, "worker")
    assert "Traceback" not in err and err.rstrip().endswith("the store is finalized: nothing left to do"), err
    assert (tmp_path / "worker.out").read_text() == f"finalized: {path}\n"
    assert store_files(path) == store_files(single)


def test_a_planner_that_saw_the_store_unfinalized_keeps_the_store_a_commit_finished_meanwhile(
        tmp_path: Path, stores) -> None:
    """A worker that read the store as not finalized, then stalled past its lease while a commit
    finished it, planned from the parts the commit had removed: it wrote an empty manifest and
    empty arrays over the finished store's, and ended with exit 0, "nothing left to do"."""
    path, single = stores
    seen = Attributes.read(Location(path))  # the worker's look at the store, before it stalled
    finalize_store(path, memory_budget_bytes=64 << 10)
    with pytest.raises(KuklaError):  # the parts it would plan from are gone
        _plan(Location(path), seen, 64 << 10, 0, None, worker=1)
    assert store_files(path) == store_files(single)


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [PLANNED, SEGMENT], ids=["having planned", "in pass 1"])
def test_a_finalize_given_another_memory_budget_never_replaces_the_plan_workers_run(tmp_path: Path, stores,
                                                                                    stop_at: str) -> None:
    """A worker started with another --memory-budget made a plan of its own and wrote it over the
    one a running worker followed: shards laid out for two plans would meet in one array."""
    path, single = stores
    worker = _worker(tmp_path, stop_at=stop_at)  # planned for 64 KiB and holding its lease
    try:
        plan = (path / "_finalize" / "plan.json").read_bytes()
        with pytest.raises(KuklaError, match="is planned for a 64KiB memory budget and finalize worker 1 is "
                                             "running it: give every worker and the commit --memory-budget 64KiB"):
            finalize_worker(path, 0, 2, memory_budget_bytes=128 << 10)
        with pytest.raises(KuklaError, match="planned for a 64KiB memory budget and finalize worker 1 is running"):
            finalize_store(path, memory_budget_bytes=128 << 10)
        assert (path / "_finalize" / "plan.json").read_bytes() == plan
    finally:
        worker.send_signal(signal.SIGCONT)
    assert worker.wait(timeout=120) == 0, _err(tmp_path, "worker")
    finalize_store(path, memory_budget_bytes=64 << 10)
    assert store_files(path) == store_files(single)


def test_a_commit_killed_as_it_ended_leaves_no_lease_once_the_store_is_seen_finalized(tmp_path: Path,
                                                                                      stores) -> None:
    """Killed between marking the store finalized and releasing its lease, the commit left
    _finalize.lock.json in the finished store, and every later finalize kept it."""
    path, single = stores
    finalize_store(path, memory_budget_bytes=64 << 10)
    dead = {"pid": 2 ** 22 + 1, "host": "node-b", "token": "0" * 32, "time": time.time() - 3600, "lease": 60}
    (path / "_finalize.lock.json").write_text(json.dumps(dead))  # what the killed commit's lease file holds
    finalize_store(path, memory_budget_bytes=64 << 10)
    assert store_files(path) == store_files(single)


@pytest.mark.slow
def test_a_worker_stalled_past_its_lease_into_the_commits_second_pass_finishes_alongside_it(
        tmp_path: Path, stores) -> None:
    """The commit, finding no live worker, removed _parts/ after its first pass; the worker,
    continued then, lost the segments of a run the commit had done and died (FileNotFoundError)."""
    path, single = stores
    worker = _worker(tmp_path, stop_at=SEGMENT, KUKLA_LEASE_SECONDS="1")
    lease = path / "_finalize.worker-1.lock.json"
    wait_for(worker, lambda: time.time() - json.loads(lease.read_text())["time"] > 1.5)  # expired
    commit = _start(tmp_path, "commit", stop_at=STALLS["pass 2"])
    try:
        assert not (path / "_parts").exists()
        worker.send_signal(signal.SIGCONT)
        assert worker.wait(timeout=120) == 0, _err(tmp_path, "worker")
    finally:
        commit.send_signal(signal.SIGCONT)
    assert commit.wait(timeout=120) == 0, _err(tmp_path, "commit")
    assert store_files(path) == store_files(single)


@pytest.mark.slow
def test_a_worker_killed_on_another_host_leaves_no_lease_in_the_finished_store(tmp_path: Path, stores) -> None:
    """Its lease file stayed in the finished store's root: store info, verify and later finalizes
    ignore it, but the store's files were no longer those a single finalize writes."""
    path, single = stores
    worker = _worker(tmp_path, stop_at=SEGMENT, KUKLA_HOST="node-b", KUKLA_LEASE_SECONDS="1")
    worker.kill()  # node-b is gone: this host cannot tell its worker is dead before its lease expires
    worker.wait()
    assert (path / "_finalize.worker-1.lock.json").exists()
    commit = _start(tmp_path, "commit")
    assert commit.wait(timeout=120) == 0, _err(tmp_path, "commit")
    assert store_files(path) == store_files(single)


def test_two_removers_clearing_one_tree_at_once_both_succeed(tmp_path: Path) -> None:
    """The commit and a worker that outlived it may both clear _finalize/: the one that found a
    file already gone failed (FileNotFoundError), and stopped with the rest of the tree left."""
    for trial in range(3):
        for folder in range(20):
            (tmp_path / "tree" / str(folder)).mkdir(parents=True)
            for name in range(100):
                (tmp_path / "tree" / str(folder) / str(name)).touch()
        errors: list[Exception] = []

        def clear() -> None:
            try:
                Location(tmp_path).remove("tree")
            except Exception as exc:  # noqa: BLE001 - what the test reports
                errors.append(exc)

        removers = [threading.Thread(target=clear) for _ in range(2)]
        for remover in removers:
            remover.start()
        for remover in removers:
            remover.join()
        assert not errors and not (tmp_path / "tree").exists(), (trial, errors)
