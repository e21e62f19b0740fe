"""The `kukla` log as the CLI shows it: lines above the progress bars, at the level asked for."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kukla.cli.app import app
from kukla.errors import KuklaError
from kukla.progress import progress, show_logs

logger = logging.getLogger("kukla.pipeline.test")
KUKLA = Path(__file__).parents[1] / "kukla"


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
