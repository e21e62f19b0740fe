"""Split finalize with real processes: workers and the commit, in any order and at any time,
all exit 0 and leave the store a single-process finalize writes, byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kukla.storage import finalize_store

from .conftest import store_files, store_state, wait_for, write_sequences  # noqa: TID252

REPO = Path(__file__).resolve().parents[2]


STOP_AT_READ = textwrap.dedent("""
    import os, re, runpy, signal, sys
    pattern, stopped = re.compile(sys.argv[1]), []
    def stop(event, args):
        reading = event == "open" and isinstance(args[0], str) and args[1] in ("r", "rb")
        if reading and not stopped and pattern.search(args[0]):
            stopped.append(args[0])
            os.kill(os.getpid(), signal.SIGSTOP)
    sys.addaudithook(stop)
    sys.argv = ["kukla", *sys.argv[2:]]
    runpy.run_module("kukla", run_name="__main__")
""")
"""`python -m kukla ARGS` that SIGSTOPs itself just before it first opens a file matching PATTERN
for reading: a stop at an exact point of kukla's own work, which runs unchanged."""

SEGMENT = r"/_parts/.*\.bin$"
"""A segment's data, which pass 1 reads."""


def _start(tmp_path: Path, name: str, *args: str, stop_at: str | None = None, **env: str) -> subprocess.Popen:
    """`kukla store finalize STORE ARGS` (split, 64 KiB budget), its stdout and stderr in NAME.out
    and NAME.err; with `stop_at`, stopped just before it first reads a file matching it."""
    launch = ["-c", STOP_AT_READ, stop_at] if stop_at else ["-m", "kukla"]
    with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, *launch, "store", "finalize", str(tmp_path / "split"),
                                 "--memory-budget", "64KiB", *args], cwd=REPO, stdout=out, stderr=err, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO), **env})
    if stop_at:
        wait_for(proc, lambda: Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T")
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
