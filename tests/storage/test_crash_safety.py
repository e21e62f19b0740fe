"""Killed writers and finalizes resume to a complete store; a full disk leaves it resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from kukla.storage import open_store

REPO = Path(__file__).resolve().parents[2]
HOOK = "blocks.0.hook_resid_post"

WRITER = textwrap.dedent("""
    import sys, time, resource
    import numpy as np
    from kukla.errors import KuklaError
    from kukla.storage import StoreWriter, finalize_store
    path, n_segments, rows, limit_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    hooks = {"blocks.0.hook_resid_post": 32}
    try:
        with StoreWriter.open(path, {"model": "toy", "hooks": hooks}, dtype="float32", codec="none",
                              chunk_rows=256) as writer:
            for segment in range(n_segments):
                if segment == limit_at:  # a real file-size limit: the next write hits EFBIG
                    resource.setrlimit(resource.RLIMIT_FSIZE, (rows * 32 * 4 // 2, resource.RLIM_INFINITY))
                if segment in writer.committed:
                    continue
                ids = np.arange(segment * rows, (segment + 1) * rows)
                x = np.repeat(ids[:, None].astype(np.float32), 32, axis=1)
                writer.write_segment(segment, {"acts/blocks.0.hook_resid_post": x, "tokens/token_id": ids,
                                               "tokens/sequence": ids // 16, "tokens/position": ids % 16})
                time.sleep(0.02)
            writer.finish()
        finalize_store(path, memory_budget_bytes=1 << 16)
    except KuklaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
""")

FINALIZE = "import sys; from kukla.storage import finalize_store; finalize_store(sys.argv[1], memory_budget_bytes=1 << 16)"


def _run(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, **kwargs)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL the process as soon as `ready()` holds (it must not have finished by then)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()}"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _assert_every_row_once(path: Path, n_rows: int) -> None:
    store = open_store(path)
    x = store.read(HOOK).numpy()
    ids = store.read("tokens/token_id").numpy()
    assert sorted(ids.tolist()) == list(range(n_rows))
    np.testing.assert_array_equal(x[:, 0], ids)
    np.testing.assert_array_equal(x[:, -1], ids)


def _journal(path: Path) -> list[str]:
    folder = path / "_parts" / "rank-00000" / "journal"
    return [n for n in os.listdir(folder) if n.endswith(".json")] if folder.exists() else []


@pytest.mark.slow
def test_store_survives_disk_full_and_kills_during_write_and_finalize(tmp_path: Path) -> None:
    """One store through every crash, each followed by a plain rerun of the same command:
    a full disk (a real RLIMIT_FSIZE), SIGKILL mid-write, SIGKILL in each shuffle pass."""
    path = tmp_path / "store"
    n_segments, rows = 12, 256
    command = [WRITER, str(path), str(n_segments), str(rows)]

    full = _run(command + ["2"])
    out, err = full.communicate(timeout=300)
    assert full.returncode == 2, err
    assert err.strip().count("\n") == 0 and "disk full" in err and "rerun the same command" in err
    assert len(_journal(path)) == 2  # what was committed before the disk filled is kept

    proc = _run(command + ["-1"])
    _kill_when(proc, lambda: len(_journal(path)) >= 5)
    assert (path / "_parts" / "rank-00000" / "lock.json").exists()  # the dead writer's lock is left behind

    proc = _run(command + ["-1"])  # takes over the stale lock, writes the rest, then finalizes
    runs = path / "_finalize" / "runs"
    _kill_when(proc, lambda: runs.exists() and sum(n.endswith(".json") for n in os.listdir(runs)) >= 2)
    assert len(_journal(path)) == n_segments

    proc = _run([FINALIZE, str(path)])
    shards = path / "_finalize" / "shards"
    _kill_when(proc, lambda: shards.exists() and any(n.endswith(".json") for n in os.listdir(shards)))
    assert not (path / "_parts").exists()  # pass 1 had completed: only the shuffle's runs remain

    rerun = _run([FINALIZE, str(path)])
    assert rerun.wait(timeout=300) == 0, rerun.communicate()
    _assert_every_row_once(path, n_segments * rows)


def test_finalize_removes_what_a_killed_shard_write_left_in_the_arrays(tmp_path: Path) -> None:
    """A SIGKILL during a shard's write leaves its temporary beside the shard; the rerun writes
    the shard under its own name, so the temporary (a whole shard's bytes) stayed in the store."""
    path = tmp_path / "store"
    proc = _run([WRITER, str(path), "4", "256", "-1"])
    shard_folder = path / "acts" / HOOK / "c"
    _kill_when(proc, lambda: (path / "_finalize" / "runs").exists())  # the arrays are laid out
    shard_folder.mkdir(parents=True, exist_ok=True)
    left = shard_folder / "0.tmp-0123456789abcdef"  # what a write killed inside `atomic_path` leaves
    left.write_bytes(b"\0" * 4096)
    rerun = _run([FINALIZE, str(path)])
    assert rerun.wait(timeout=300) == 0, rerun.communicate()
    _assert_every_row_once(path, 4 * 256)
    assert not left.exists()
    assert not [p for p in path.rglob("*") if ".tmp-" in p.name]


def test_racing_exclusive_creates_leave_one_winner_and_its_whole_file(tmp_path: Path) -> None:
    """Finalize's plan and every lease are made by whichever racing process creates them first:
    exactly one learns it won, the file is its data whole, and no temporary stays behind."""
    script = textwrap.dedent("""
        import sys
        from kukla.atomic import create_atomic
        data = sys.argv[2].encode() * 200_000
        print(create_atomic(sys.argv[1], data), flush=True)
    """)
    for trial in range(3):
        target = tmp_path / f"plan-{trial}.json"
        racers = [subprocess.Popen([sys.executable, "-c", script, str(target), str(i)], stdout=subprocess.PIPE,
                                   text=True, env={**os.environ, "PYTHONPATH": str(REPO)}) for i in range(4)]
        won = [racer.communicate(timeout=60)[0].strip() == "True" for racer in racers]
        assert sum(won) == 1, won
        assert target.read_bytes() == str(won.index(True)).encode() * 200_000
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"plan-{t}.json" for t in range(trial + 1))
