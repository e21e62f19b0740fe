"""Training under preemption and damage: SIGTERM writes a checkpoint and exits 143, a second
trainer on the same --out is refused, and a full disk during a checkpoint is one line and leaves
nothing half-written. (An --out that is a file: tests/test_output_is_a_file.py.)"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_resume import NAME
from test_resume import _flags as resume_flags
from safetensors.torch import load_file

from kukla.pipeline.train import checkpoint
from tests.cli import kukla, one_line_error

REPO = Path(__file__).resolve().parents[2]


def _flags(store: Path, out: Path, *extra: str) -> list[str]:
    """test_resume's run, made long enough to stop mid-way, with no periodic checkpoint."""
    return resume_flags(store, out, "--tokens", str(128 * 400), "--checkpoint-every", "0", *extra)


def _train(*args: str) -> None:
    code, output = kukla("train", *args)
    assert code == 0, output


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_143_and_the_resumed_run_equals_an_uninterrupted_one(
        store: Path, tmp_path: Path) -> None:
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    proc = subprocess.Popen([sys.executable, "-m", "kukla", "train", *_flags(store, stopped)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (stopped / "metrics.jsonl").exists():  # training is under way (step 20 is logged)
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    one_line_error(*kukla("train", *_flags(store, stopped, "--resume")), "training run", "is in use by process")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert re.fullmatch(r"stopped: SIGTERM after step \d+ of \d+: a checkpoint is written; "
                        r"rerun with --resume to continue exactly", err.rstrip().splitlines()[-1]), err[-3000:]
    assert "Traceback" not in err
    latest = checkpoint.latest_checkpoint(stopped)
    assert latest is not None and latest.name < "step-00000400", "no checkpoint, or the run had finished"
    assert not (stopped / "lock.json").exists() and not (stopped / NAME).exists()

    _train(*_flags(store, stopped, "--resume"))
    _train(*_flags(store, whole))
    a = load_file(str(whole / NAME / "sae_weights.safetensors"))
    b = load_file(str(stopped / NAME / "sae_weights.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_half_written_folder(
        store: Path, small_disk: Path) -> None:
    out = small_disk / "run"
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    filler.write_bytes(b"\0" * (free - 64 * 1024))  # room for the log, not for a checkpoint (~100 KiB)
    one_line_error(*kukla("train", *_flags(store, out, "--tokens", str(128 * 20))),
                   "disk full while writing checkpoint", "--resume")
    leftovers = [p.name for p in (out / "checkpoints").iterdir()] if (out / "checkpoints").exists() else []
    assert not [name for name in leftovers if name.startswith(".tmp-")], leftovers
    assert checkpoint.latest_checkpoint(out) is None and not (out / "lock.json").exists()
    filler.unlink()
    _train(*_flags(store, out, "--tokens", str(128 * 20), "--resume"))
    assert (out / NAME / "sae_weights.safetensors").exists()
