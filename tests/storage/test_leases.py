"""Leases across hosts, and SIGTERM to real harvest and finalize processes: each stops at a
committed point with exit 143, releases its lease, and a rerun ends with the store an
uninterrupted run writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kukla.cli.app import app
from kukla.config import from_dict
from kukla.errors import KuklaError
from kukla.pipeline.harvest import HarvestConfig, harvest
from kukla.storage import StoreWriter, finalize_store, open_store

from .conftest import HOOKS, wait_for, write_sequences  # noqa: TID252

REPO = Path(__file__).resolve().parents[2]

HOLDER = textwrap.dedent("""
    import sys, time
    from kukla.storage import StoreWriter
    writer = StoreWriter.open(sys.argv[1], {"model": "toy", "hooks": {"blocks.0.hook_resid_post": 8,
                                                                      "blocks.0.hook_mlp_out": 4}})
    print("holding", flush=True)
    time.sleep(600)
""")


def _start(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO), **env})


STOPPED = "stopped: SIGTERM: committed work is kept; rerun the same command to resume"
"""How a harvest, finalize or import stopped by SIGTERM ends: what happened, and how to go on."""


def _assert_same_store(a: Path, b: Path) -> None:
    x, y = open_store(a), open_store(b)
    assert x.n_rows == y.n_rows and x.meta["hook_stats"] == y.meta["hook_stats"]
    for name in x.specs:
        np.testing.assert_array_equal(x.read_stored(name), y.read_stored(name), err_msg=name)


def test_a_live_lease_on_another_host_is_refused_and_a_dead_ones_is_taken_over_once_expired(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """node-b cannot tell whether node-a's holder is dead: it watches the lease, refusing it once
    renewed and taking it over once expired, so a job rescheduled at once onto node-b starts (it
    failed on its predecessor's lease, which only the lease's expiry frees)."""
    path = tmp_path / "s"
    holder = _start(["-c", HOLDER, str(path)], KUKLA_HOST="node-a", KUKLA_LEASE_SECONDS="2")
    assert holder.stdout.readline().strip() == "holding", holder.stderr.read()
    monkeypatch.setenv("KUKLA_HOST", "node-b")
    time.sleep(2.5)  # longer than the lease: only the holder's renewals keep it alive
    with pytest.raises(KuklaError, match="in use by process .* on node-a"):
        StoreWriter.open(path, {"model": "toy", "hooks": HOOKS})
    holder.send_signal(signal.SIGKILL)  # the pod is evicted: node-a's lease is never released
    holder.wait()
    killed = time.time()
    renewed = json.loads((path / "_parts" / "rank-00000" / "lock.json").read_text())["time"]
    with StoreWriter.open(path, {"model": "toy", "hooks": HOOKS}) as writer:  # taken over once it expired
        assert writer.lock.held and writer.committed == set()
    assert renewed + 2 <= time.time() < killed + 2 + 1


def test_a_dead_holders_lease_is_taken_over_with_the_temporary_of_the_renewal_it_died_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A holder stopped or killed between writing its renewal and renaming it over the lease left
    the temporary in the store for good (a finished store kept `_finalize.worker-1.lock.json.tmp-…`)."""
    path = tmp_path / "s"
    holder = _start(["-c", HOLDER, str(path)], KUKLA_HOST="node-a", KUKLA_LEASE_SECONDS="1")
    assert holder.stdout.readline().strip() == "holding", holder.stderr.read()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lease = path / "_parts" / "rank-00000" / "lock.json"
    lease.with_name(f"{lease.name}.tmp-0123456789abcdef").write_bytes(lease.read_bytes())  # its renewal's write
    monkeypatch.setenv("KUKLA_HOST", "node-b")
    time.sleep(1.5)  # past the lease
    with StoreWriter.open(path, {"model": "toy", "hooks": HOOKS}) as writer:
        assert writer.lock.held
        assert sorted(p.name for p in lease.parent.glob("lock.json*")) == ["lock.json"]


@pytest.mark.slow
def test_sigterm_stops_finalize_at_a_committed_point_and_the_rerun_equals_an_uninterrupted_one(
        tmp_path: Path) -> None:
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    write_sequences(stopped, 48, 64, per_segment=8)
    shutil.copytree(stopped, whole)
    finalize_store(whole, memory_budget_bytes=64 << 10, seed=5)

    proc = _start(["-m", "kukla", "store", "finalize", str(stopped), "--memory-budget", "64KiB", "--seed", "5"])
    wait_for(proc, lambda: (stopped / "_finalize" / "runs" / "run-000003.json").exists())
    with pytest.raises(KuklaError, match="finalize of .* is in use by process"):  # a second finalize is refused
        finalize_store(stopped, memory_budget_bytes=64 << 10, seed=5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.rstrip().splitlines()[-1] == STOPPED and "Traceback" not in err, err[-3000:]
    assert not (stopped / "_finalize.lock.json").exists()  # the lease went with it
    assert json.loads((stopped / "zarr.json").read_text())["attributes"]["kukla"]["state"] == "finalizing"

    finalize_store(stopped, memory_budget_bytes=64 << 10, seed=5)
    _assert_same_store(stopped, whole)


@pytest.mark.slow
def test_sigterm_stops_harvest_releasing_its_lease_and_the_rerun_equals_an_uninterrupted_one(
        tmp_path: Path) -> None:
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    flags = ["--source", "toy-tree", "--toy-dim", "16", "--toy-tree", "8,2", "--tokens", "4096",
             "--context-size", "16", "--segment-windows", "2", "--memory-budget", "1MB"]
    journal = stopped / "_parts" / "rank-00000" / "journal"
    proc = _start(["-m", "kukla", "harvest", str(stopped), *flags])
    wait_for(proc, lambda: journal.exists() and len(os.listdir(journal)) >= 10)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.rstrip().splitlines()[-1] == STOPPED and "Traceback" not in err, err[-3000:]
    assert not (stopped / "_parts" / "rank-00000" / "lock.json").exists()
    assert len(os.listdir(journal)) < 4096 // 32, "the harvest finished before SIGTERM"

    settings = {"source": "toy-tree", "toy": {"dim": 16, "tree": "8,2"}, "tokens": 4096, "context_size": 16,
                "segment_windows": 2, "memory_budget": "1MB"}
    for out in (stopped, whole):  # the same settings, run in this process
        harvest(from_dict(HarvestConfig, {**settings, "output": str(out)}))
    _assert_same_store(stopped, whole)


@pytest.mark.slow
def test_a_harvest_stopped_during_finalize_finishes_when_rerun_and_a_retry_after_that_keeps_the_store(
        tmp_path: Path) -> None:
    flags = ["--source", "toy-tree", "--toy-dim", "16", "--toy-tree", "8,2", "--tokens", "8192",
             "--context-size", "16", "--segment-windows", "8", "--memory-budget", "64KiB", "--seed", "4"]
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    proc = _start(["-m", "kukla", "harvest", str(stopped), *flags])
    wait_for(proc, lambda: (stopped / "_finalize" / "runs" / "run-000002.json").exists())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    for out in (stopped, whole):  # a rescheduled job reruns the same command
        result = CliRunner().invoke(app, ["harvest", str(out), *flags])
        assert result.exit_code == 0, result.output
    _assert_same_store(stopped, whole)

    before = (whole / "zarr.json").read_bytes()
    result = CliRunner().invoke(app, ["harvest", str(whole), *flags])  # a job retried after it succeeded
    assert result.exit_code == 0, result.output
    assert (whole / "zarr.json").read_bytes() == before
    for changed, refusal in ((["--holdout-rows", "7"], "already finalized with shuffle seed 4 and 81 held-out rows"),
                             (["--seed", "5"], "holds a store of a different run")):  # the toy's seed too
        result = CliRunner().invoke(app, ["harvest", str(whole), *flags, *changed])
        assert result.exit_code == 2 and refusal in result.output, result.output


@pytest.mark.slow
def test_an_import_stopped_during_finalize_finishes_when_the_same_command_is_rerun(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((6000, 32)).astype(np.float32))
    args = ["store", "import", "--hook", f"h={tmp_path / 'x.npy'}", "--memory-budget", "64KiB", "--seed", "2"]
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    proc = _start(["-m", "kukla", *args, str(stopped)])
    wait_for(proc, lambda: (stopped / "_finalize" / "runs" / "run-000002.json").exists())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    for out in (stopped, whole):
        result = CliRunner().invoke(app, [*args, str(out)])
        assert result.exit_code == 0, result.output
    _assert_same_store(stopped, whole)


def test_a_holder_whose_lease_was_taken_over_stops_at_its_next_check(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUKLA_LEASE_SECONDS", "0.4")
    write_sequences(tmp_path / "s", 4, 16, finish=False)
    writer = StoreWriter.open(tmp_path / "s", {"model": "toy", "hooks": HOOKS, "context_size": 16}, dtype="float32", chunk_rows=16)
    lock = tmp_path / "s" / "_parts" / "rank-00000" / "lock.json"
    taken = {**json.loads(lock.read_text()), "token": "another", "host": "node-c", "time": time.time() + 60}
    lock.write_text(json.dumps(taken))  # what a taker writes once it judged this lease expired
    time.sleep(0.5)  # one renewal period: the holder re-reads the lease and sees it is not its own
    with pytest.raises(KuklaError, match="lease was taken over by process .* on node-c"):
        writer.write_segment(9, {})
    writer.close()
    assert json.loads(lock.read_text())["token"] == "another"  # closing leaves the new holder's lease alone
