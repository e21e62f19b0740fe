"""A dictionary's training curves, read back from the `metrics.jsonl` its training run wrote.

`kukla train` writes one line per logged step and sweep member into its output directory,
beside the member's dictionary directory (out/<member>/), so the log is found from the
dictionary alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from kukla.pipeline.train.log import METRICS_FILE

CURVE_KEYS = ("fvu", "l0", "dead_pct", "lr")


def training_curves(dictionary_dir: Path, member: str | None = None) -> dict[str, list[float]] | None:
    """Columns over steps (`tokens` and every logged figure) for one member; None when no log is there."""
    path = Path(dictionary_dir).parent / METRICS_FILE
    if not path.is_file():
        return None
    name = member or Path(dictionary_dir).name
    columns: dict[str, list[float]] = {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in lines if r.get("dictionary") == name and not r.get("final") and "tokens" in r]
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key not in ("step", "tokens_per_s"):
                columns.setdefault(key, []).append(float(value))
    return columns if rows else None
