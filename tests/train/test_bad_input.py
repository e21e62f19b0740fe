"""Every mistake a user can make with `kukla train` ends in one line that says what to fix (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from conftest import HOOK
from stores import write_store
from typer.testing import CliRunner

from kukla.cli.app import train_command as command
from kukla.pipeline.train import checkpoint

runner = CliRunner()
app = typer.Typer()
app.command("train")(command)
app.command("other")(lambda: None)


def _fails(*args: str) -> str:
    """Run `kukla train` and return its one-line error."""
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output  # one line, last
    return errors[0]


def _args(store: Path, out: Path, *extra: str) -> list[str]:
    return [str(store), "--out", str(out), "--batch-size", "256", "--tokens", "2560", "--threads", "1", *extra]


def test_missing_store_is_refused(tmp_path: Path) -> None:
    assert "does not exist" in _fails(*_args(tmp_path / "nope.zarr", tmp_path / "o", "--hook", HOOK))
    assert not (tmp_path / "o").exists()  # nothing made for a run that never starts


def test_unfinalized_store_is_refused(tmp_path: Path) -> None:
    store = write_store(tmp_path / "s.zarr", 1024, finalize=False)
    assert "not finalized" in _fails(*_args(store, tmp_path / "o", "--hook", HOOK))
    assert not (tmp_path / "o").exists()


def test_hook_not_in_store_names_the_hooks_it_holds(store: Path, tmp_path: Path) -> None:
    message = _fails(*_args(store, tmp_path / "o", "--hook", "blocks.0.hook_resid_pre"))
    assert "'blocks.0.hook_resid_pre' is not in store" in message and HOOK in message
    assert not (tmp_path / "o").exists()


def test_a_bad_dictionary_setting_is_one_line_naming_the_field_before_anything_is_written(
        store: Path, tmp_path: Path) -> None:  # each setting's checks: tests/train/test_config.py
    flags = ["--hook", HOOK, "--width", "64", "--width", "128", "--k", "4", "--k", "80"]
    assert "k: must be above 0 and below width 64" in _fails(*_args(store, tmp_path, *flags))
    assert not any(tmp_path.iterdir())


def test_diverging_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(store: Path, tmp_path: Path) -> None:
    message = _fails(*_args(store, tmp_path, "--hook", HOOK, "--arch", "topk", "--width", "64", "--k", "4",
                            "--lr", "1e30", "--warmup", "0", "--checkpoint-every", "1"))
    assert "not finite at step 1" in message and "mean norm" in message and "store rows" in message
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000001" and latest.name in message
    assert not (tmp_path / "topk-w64-k4-s0").exists()


def test_out_of_memory_says_what_to_reduce(store: Path, tmp_path: Path) -> None:
    message = _fails(*_args(store, tmp_path, "--hook", HOOK, "--arch", "topk", "--width", str(2**36), "--k", "4"))
    assert "out of memory" in message and "--batch-size" in message and "--width" in message


def test_skipping_massive_rows_needs_a_store_that_flags_them(store: Path, tmp_path: Path) -> None:
    message = _fails(*_args(store, tmp_path, "--hook", HOOK, "--arch", "topk", "--width", "32", "--k", "4",
                            "--massive", "skip"))
    assert "no tokens/massive flags" in message and "massive = keep" in message
