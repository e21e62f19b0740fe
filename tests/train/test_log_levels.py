"""What a training run says on stderr: warnings always, progress notes when the CLI shows them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HOOK
from typer.testing import CliRunner

from kukla.cli.app import app

REPO = Path(__file__).resolve().parents[2]
# dead_tokens ≥ tokens draws a warning; a BatchTopK run ends with a note of its calibrated L0
SETTINGS = {"hook": HOOK, "arch": "batchtopk", "width": [32], "k": [4], "tokens": 512, "batch_size": 256,
            "dead_tokens": 1024, "calibration_tokens": 512, "threads": 1}
WARNING = "warning: dead_tokens 1,024 ≥ the run's 512 tokens"
NOTE = "calibrated inference L0"


@pytest.mark.parametrize("quiet, shown", [([], {WARNING, NOTE}), (["-q"], {WARNING})])
def test_the_cli_shows_notes_unless_quiet_and_warnings_always(
        store: Path, tmp_path: Path, quiet: list[str], shown: set[str]) -> None:
    flags = [item for key, value in SETTINGS.items()
             for item in (f"--{key.replace('_', '-')}", str(value[0] if isinstance(value, list) else value))]
    result = CliRunner().invoke(app, [*quiet, "train", str(store), "--out", str(tmp_path), *flags])
    assert result.exit_code == 0, result.output
    assert {m for m in (WARNING, NOTE) if m in result.stderr} == shown, result.stderr


def test_training_from_python_prints_the_warning_but_no_notes(store: Path, tmp_path: Path) -> None:
    settings = {**SETTINGS, "store": str(store), "out": str(tmp_path)}
    script = ("from kukla.config import from_dict\nfrom kukla.pipeline.train import train\n"
              "from kukla.pipeline.train.config import TrainConfig\n"
              f"train(from_dict(TrainConfig, {settings!r}))\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert WARNING.removeprefix("warning: ") in run.stderr and NOTE not in run.stderr, run.stderr
