"""The `kukla` log as the CLI shows it: lines above the progress bars, at the level asked for."""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kukla.cli.app import app
from kukla.errors import KuklaError
from kukla.progress import progress, show_logs

logger = logging.getLogger("kukla.pipeline.test")
KUKLA = Path(__file__).parents[1] / "kukla"
ROOT = KUKLA.parent


def _terminal_writes(tree: ast.AST) -> list[int]:
    """Lines that print, touch sys.stdout/sys.stderr, or write through tqdm or a bar."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                (node.value.id == "sys" and node.attr in ("stdout", "stderr"))
                or (node.attr == "write" and (node.value.id == "tqdm" or "bar" in node.value.id))):
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "write" and isinstance(node.value, ast.Attribute) \
                and "bar" in node.value.attr:
            lines.append(node.lineno)
    return sorted(set(lines))


def test_no_module_below_the_cli_writes_to_the_terminal_but_through_the_log() -> None:
    offenders = {str(path.relative_to(KUKLA)): lines for path in KUKLA.rglob("*.py")
                 if path.relative_to(KUKLA).parts[0] != "cli" and path.name != "progress.py"
                 and (lines := _terminal_writes(ast.parse(path.read_text())))}
    assert offenders == {}, offenders
    assert _terminal_writes(ast.parse("import sys\nprint('x')\nself.bar.write('y')\nsys.stderr.flush()")) == [2, 3, 4]


def test_a_line_logged_while_a_bar_is_open_stands_on_a_line_of_its_own(capsys: pytest.CaptureFixture) -> None:
    show_logs()
    with progress(10, "work") as bar:
        bar.update(3)
        logger.info("halfway note")
        bar.update(7)
    pieces = re.split(r"[\r\n]", capsys.readouterr().err)
    assert "halfway note" in pieces, pieces  # not glued to the bar's text
    assert any(p.startswith("work: 100%") for p in pieces), pieces  # the bar went on below it


@pytest.mark.parametrize("level, shown", [
    ("debug", {"detail", "note", "warning: trouble"}), ("info", {"note", "warning: trouble"}),
    ("warning", {"warning: trouble"}), ("error", set()),
])
def test_show_logs_shows_the_records_at_its_level_and_above(
        level: str, shown: set, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUKLA_LOG_LEVEL", level.upper())
    show_logs()
    show_logs()  # configuring twice must not repeat lines
    logger.debug("detail")
    logger.info("note")
    logger.warning("trouble")
    assert capsys.readouterr().err.splitlines() == [m for m in ("detail", "note", "warning: trouble") if m in shown]


def test_a_bad_log_level_is_one_error_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUKLA_LOG_LEVEL", "loud")
    with pytest.raises(KuklaError, match="set KUKLA_LOG_LEVEL"):
        show_logs()
    result = CliRunner().invoke(app, ["store", "info", "nowhere.zarr"])
    assert result.exit_code == 2 and result.output.splitlines() == [
        "error: log level 'loud' is not one of debug, info, warning, error: set KUKLA_LOG_LEVEL to one of them"]


def test_hugging_faces_bars_go_at_warning_and_come_back_when_show_logs_shows_notes_again() -> None:
    """One process may run a quiet command and then one that is not (the docstring's promise)."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    show_logs("warning")
    assert are_progress_bars_disabled() and not transformers_logging.is_progress_bar_enabled()
    show_logs()
    assert not are_progress_bars_disabled() and transformers_logging.is_progress_bar_enabled()


@pytest.fixture(scope="module")
def local_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A saved Hugging Face model folder, and a text file to harvest with it."""
    from tests.harvest.conftest import build_tiny_model_dir, write_texts

    folder = tmp_path_factory.mktemp("local-model")
    return build_tiny_model_dir(folder / "model"), write_texts(folder / "texts.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_hides_the_bars_transformers_draws_while_a_model_loads(
        quiet: bool, local_model: tuple[Path, Path], tmp_path: Path) -> None:
    """`kukla -q` is for warnings and errors: no "Loading weights" bar from transformers; without
    -q that bar shows, and kukla's own bar too."""
    model, texts = local_model
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_DISABLE_PROGRESS_BARS"}
    run = subprocess.run([sys.executable, "-m", "kukla", *(["-q"] if quiet else []), "harvest", str(tmp_path / "s"),
                          "--model", str(model), "--dataset", str(texts), "--hook", "resid_post:0",
                          "--tokens", "200", "--context-size", "16"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    bars = {piece.split(":")[0] for piece in re.split(r"[\r\n]", run.stderr) if "%|" in piece}
    assert ("Loading weights" in bars) is not quiet, bars
    if not quiet:
        assert "harvest rank 0/1" in bars, bars
