"""Progress bars for every long step: rate (tokens/s), ETA, and extra figures as postfix."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


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
