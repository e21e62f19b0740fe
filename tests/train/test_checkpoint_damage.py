"""A flipped byte in a checkpoint's trainer state (which torch.load reads without complaint, as
other numbers) is refused by `--resume` in one line, instead of resuming from wrong weights."""

from __future__ import annotations

from pathlib import Path

from test_resume import _flags

from kukla.pipeline.train import checkpoint
from tests.cli import kukla, one_line_error


def test_a_damaged_trainer_state_is_refused_on_resume_and_the_intact_one_resumes(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, output = kukla("train", *_flags(store, out, "--tokens", str(128 * 40)))
    assert code == 0, output
    state = checkpoint.latest_checkpoint(out) / checkpoint.STATE_FILE
    intact = state.read_bytes()
    damaged = bytearray(intact)
    damaged[len(damaged) // 2] ^= 0x40  # inside a tensor's bytes: the pickle still loads
    state.write_bytes(bytes(damaged))
    resume = ("train", *_flags(store, out, "--tokens", str(128 * 40), "--resume"))
    one_line_error(*kukla(*resume), f"{state} is damaged (checksum mismatch)", "without --resume")
    state.write_bytes(intact)
    code, output = kukla(*resume)
    assert code == 0, output
