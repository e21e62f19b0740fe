"""A flipped byte in a checkpoint's trainer state (which torch.load reads without complaint, as
other numbers) is refused by `--resume` in one line, instead of resuming from wrong weights."""

from __future__ import annotations

from pathlib import Path

from test_resume import _flags
from typer.testing import CliRunner

from kukla.cli.app import app
from kukla.pipeline.train import checkpoint

runner = CliRunner()


def test_a_damaged_trainer_state_is_refused_on_resume_and_the_intact_one_resumes(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = runner.invoke(app, ["train", *_flags(store, out, "--tokens", str(128 * 40))])
    assert first.exit_code == 0, first.output
    state = checkpoint.latest_checkpoint(out) / checkpoint.STATE_FILE
    intact = state.read_bytes()
    damaged = bytearray(intact)
    damaged[len(damaged) // 2] ^= 0x40  # inside a tensor's bytes: the pickle still loads
    state.write_bytes(bytes(damaged))
    resumed = runner.invoke(app, ["train", *_flags(store, out, "--tokens", str(128 * 40), "--resume")])
    errors = [line for line in resumed.output.splitlines() if line.startswith("error:")]
    assert resumed.exit_code == 2 and len(errors) == 1 and "Traceback" not in resumed.output, resumed.output
    assert f"{state} is damaged (checksum mismatch)" in errors[0] and "without --resume" in errors[0], errors[0]
    state.write_bytes(intact)
    resumed = runner.invoke(app, ["train", *_flags(store, out, "--tokens", str(128 * 40), "--resume")])
    assert resumed.exit_code == 0, resumed.output
