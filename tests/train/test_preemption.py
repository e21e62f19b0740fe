"""Training under preemption and damage: SIGTERM writes a checkpoint and exits 143, a second
trainer on the same --out is refused, a full disk during a checkpoint is one line and leaves
nothing half-written, and an --out that is a file is refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HOOK
from safetensors.torch import load_file
from typer.testing import CliRunner

from kukla.cli.app import app
from kukla.config import from_dict
from kukla.pipeline.train import TrainConfig, checkpoint, train

REPO = Path(__file__).resolve().parents[2]
NAME = "matryoshka-prefix-w64-k4-s0"
runner = CliRunner()


def _flags(store: Path, out: Path, *extra: str) -> list[str]:
    return [str(store), "--hook", HOOK, "--out", str(out), "--arch", "matryoshka-prefix", "--width", "64",
            "--k", "4", "--n-prefixes", "3", "--batch-size", "128", "--tokens", str(128 * 400),
            "--checkpoint-every", "0", "--log-every", "20", "--dead-tokens", "2000", "--threads", "1", *extra]


def _config(store: Path, out: Path, **changes: object) -> TrainConfig:
    flags = _flags(store, out)[1:]
    data = {flags[i][2:].replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}
    return from_dict(TrainConfig, {**data, "store": store, **changes})


def _one_line_error(result, *needles: str) -> None:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], result.output


def test_sigterm_checkpoints_and_exits_143_and_the_resumed_run_equals_an_uninterrupted_one(
        store: Path, tmp_path: Path) -> None:
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    proc = subprocess.Popen([sys.executable, "-m", "kukla.cli.train", *_flags(store, stopped)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (stopped / "metrics.jsonl").exists():  # training is under way (step 20 is logged)
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    second = runner.invoke(app, ["train", *_flags(store, stopped, "--resume")])
    _one_line_error(second, "training run", "is in use by process")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err
    latest = checkpoint.latest_checkpoint(stopped)
    assert latest is not None and latest.name < "step-00000400", "no checkpoint, or the run had finished"
    assert not (stopped / "lock.json").exists() and not (stopped / NAME).exists()

    train(_config(store, stopped, resume=True))
    train(_config(store, whole))
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
    result = runner.invoke(app, ["train", *_flags(store, out, "--tokens", str(128 * 20))])
    _one_line_error(result, "disk full while writing checkpoint", "--resume")
    leftovers = [p.name for p in (out / "checkpoints").iterdir()] if (out / "checkpoints").exists() else []
    assert not [name for name in leftovers if name.startswith(".tmp-")], leftovers
    assert checkpoint.latest_checkpoint(out) is None and not (out / "lock.json").exists()
    filler.unlink()
    done = runner.invoke(app, ["train", *_flags(store, out, "--tokens", str(128 * 20), "--resume")])
    assert done.exit_code == 0, done.output
    assert (out / NAME / "sae_weights.safetensors").exists()


def test_an_out_that_is_a_file_is_refused_in_one_line(store: Path, tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("not a folder")
    _one_line_error(runner.invoke(app, ["train", *_flags(store, file)]), "--out", "is a file")
    _one_line_error(runner.invoke(app, ["evaluate", str(tmp_path), "--store", str(store), "--out", str(file)]),
                    "--out", "is a file")
