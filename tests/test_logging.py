"""The `kukla` log as the CLI shows it: lines above the progress bars, at the level asked for."""

from __future__ import annotations

import logging
import re

import pytest
from typer.testing import CliRunner

from kukla.cli.app import app
from kukla.errors import KuklaError
from kukla.progress import progress, show_logs

logger = logging.getLogger("kukla.pipeline.test")


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
