"""What a run shows on stderr: progress bars for every long step, and the `kukla` log lines above them.

Every module logs to `logging.getLogger(__name__)`, under the `kukla` logger. The library
configures no handler, so Python shows only warnings (on stderr) unless the user sets up
logging; the CLI calls `show_logs` once, which writes each record through tqdm so a line
lands above the bars instead of breaking them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from tqdm.auto import tqdm

from kukla.errors import KuklaError

LOG_LEVEL_ENV = "KUKLA_LOG_LEVEL"
LEVELS = ("debug", "info", "warning", "error")


def progress(total: int | None, desc: str, unit: str = "tok", **kwargs: Any) -> tqdm:
    """A tqdm bar with SI-scaled rates; in batch-job logs (no TTY) it updates every 30 s."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        dynamic_ncols=True,
        mininterval=0.2 if interactive else 30.0,
        smoothing=0.1,
        file=sys.stderr,
        **kwargs,
    )


class _UnderBars(logging.Handler):
    """Writes a record to the current stderr through tqdm, which redraws any open bar below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: a failing handler reports itself and never raises
            self.handleError(record)


class _Lines(logging.Formatter):
    """The message alone; a warning or error leads with its level (`warning: …`)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def show_logs(level: str | None = None) -> None:
    """Show the `kukla` records at `level` and above (default: $KUKLA_LOG_LEVEL, else info) on stderr.

    Calling it again replaces the earlier setting, so one process can run several commands.
    """
    level = (level or os.environ.get(LOG_LEVEL_ENV) or "info").lower()
    if level not in LEVELS:
        raise KuklaError(f"log level {level!r} is not one of {', '.join(LEVELS)}: set {LOG_LEVEL_ENV} to one of them")
    logger = logging.getLogger("kukla")
    for old in [h for h in logger.handlers if isinstance(h, _UnderBars)]:
        logger.removeHandler(old)
    handler = _UnderBars()
    handler.setFormatter(_Lines())
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False  # the CLI owns the process: a root handler set by a dependency must not repeat lines
