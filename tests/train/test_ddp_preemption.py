"""SIGTERM to torchrun under DDP (gloo): torchrun forwards it, every rank stops at the same logging
step, rank 0 writes a checkpoint, each rank and the launcher (`kukla.cli.torchrun`) exit 143 with
one line, and `--resume` under two ranks ends with the weights of an uninterrupted two-rank run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HOOK
from safetensors.torch import load_file

from kukla.pipeline.train import checkpoint

REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH = 120, 256
NAME = "batchtopk-w64-k4-s0"


def _torchrun(store: Path, out: Path, *extra: str) -> subprocess.Popen:
    flags = ["--hook", HOOK, "--out", str(out), "--arch", "batchtopk", "--width", "64", "--k", "4",
             "--batch-size", str(BATCH), "--tokens", str(BATCH * STEPS), "--checkpoint-every", "0",
             "--dead-tokens", "512", "--log-every", "4", "--threads", "1", "--device", "cpu", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "kukla.cli.torchrun", "--standalone", "--nproc_per_node", "2",
         "-m", "kukla", "train", str(store), *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / NAME / "sae_weights.safetensors"))


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_exits_143_and_the_resumed_run_equals_an_uninterrupted_one(
        store: Path, tmp_path: Path) -> None:
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    proc = _torchrun(store, stopped)
    deadline = time.time() + 300
    while not (stopped / "metrics.jsonl").exists():  # the ranks are training (step 4 is logged)
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # what Kubernetes sends the pod's torchrun
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert err.rstrip().splitlines()[-1].startswith("stopped: torchrun got SIGTERM"), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    # Both ranks, at the same step. The ranks and torchrun share stderr, so whatever one of them writes
    # while rank 0's bar is drawn (torchrun's own warnings too) lands after the bar on the same line:
    # look for the words, not the line start.
    stops = re.findall(r"stopped: SIGTERM after step (\d+) of \d+", err)
    assert len(stops) == 2 and stops[0] == stops[1], err[-3000:]
    step = int(stops[0])
    assert 0 < step < STEPS and step % 4 == 0, stops
    latest = checkpoint.latest_checkpoint(stopped)
    assert latest is not None and latest.name == f"step-{step:08d}", latest
    assert checkpoint.load_state(latest)["world"] == 2
    assert not (stopped / "lock.json").exists() and not (stopped / NAME).exists()

    _finish(_torchrun(store, stopped, "--resume"))
    _finish(_torchrun(store, whole))
    a, b = _weights(whole), _weights(stopped)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
