"""A kukla error under `python -m kukla.cli.torchrun` ends in one line and the rank's exit status, as it does
in one process: a run rescheduled onto another number of ranks is refused with what to do, not buried
under torchrun's own traceback and failure report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HOOK

REPO = Path(__file__).resolve().parents[2]


def _train(store: Path, out: Path, launcher: list[str], *extra: str) -> subprocess.CompletedProcess:
    flags = ["--hook", HOOK, "--out", str(out), "--arch", "batchtopk", "--width", "64", "--k", "4",
             "--batch-size", "256", "--tokens", str(256 * 4), "--checkpoint-every", "2", "--log-every", "2",
             "--threads", "1", "--device", "cpu", *extra]
    return subprocess.run([sys.executable, *launcher, "-m", "kukla", "train", str(store), *flags], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_one_process_run_resumed_under_two_ranks_is_refused_in_one_line(store: Path, tmp_path: Path) -> None:
    first = _train(store, tmp_path, [])
    assert first.returncode == 0, first.stderr[-3000:]
    torchrun = ["-m", "kukla.cli.torchrun", "--standalone", "--nproc_per_node", "2"]
    resumed = _train(store, tmp_path, torchrun, "--resume")
    assert resumed.returncode == 2, resumed.stderr[-3000:]  # a kukla error's status, as in one process
    assert "the run had 1 process(es), this launch has 2; resume with the same number of processes" in resumed.stderr
    assert "Traceback" not in resumed.stderr and "ChildFailedError" not in resumed.stderr, resumed.stderr[-3000:]
    assert resumed.stderr.rstrip().splitlines()[-1].startswith("error: rank "), resumed.stderr[-3000:]
