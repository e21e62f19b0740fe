"""What a run shows on stderr: progress bars for every long step, and the `kukla` log lines above them.

Every module logs to `logging.getLogger(__name__)`, under the `kukla` logger. The library
configures no handler, so Python shows only warnings (on stderr) unless the user sets up
logging; the CLI calls `show_logs` once, which writes each record through tqdm so a line
lands above the bars instead of breaking them. At `warning` and above (`kukla -q`) it also turns
off the bars transformers and huggingface_hub draw themselves ("Loading weights", downloads).
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

    From `warning` up, transformers' and huggingface_hub's own bars are off too. Calling it again
    replaces the earlier setting, so one process can run several commands.
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
    _hugging_face_bars(shown=logger.level <= logging.INFO)


_hid_hugging_face_bars = False
"""Whether `show_logs` turned Hugging Face's bars off, so a later call turns them back on (and only then)."""


def _hugging_face_bars(shown: bool) -> None:
    """Turn transformers' and huggingface_hub's own progress bars off or back on; the user's
    HF_HUB_DISABLE_PROGRESS_BARS, or a switch they flipped themselves, is left as it is."""
    global _hid_hugging_face_bars
    if shown and not _hid_hugging_face_bars:
        return  # nothing to undo, and no import for a command that shows everything
    from huggingface_hub import constants, utils  # light (no torch): the CLI calls this before every command

    # transformers copies huggingface_hub's switch when first imported; once imported it keeps its own
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if not shown and constants.HF_HUB_DISABLE_PROGRESS_BARS is None and not utils.are_progress_bars_disabled():
        utils.disable_progress_bars()
        if transformers_logging is not None:
            transformers_logging.disable_progress_bar()
        _hid_hugging_face_bars = True
    elif shown:
        utils.enable_progress_bars()
        if transformers_logging is not None:
            transformers_logging.enable_progress_bar()
        _hid_hugging_face_bars = False
