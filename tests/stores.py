"""The tests' one factory of small real stores: rows per hook in, a finalized store on disk out.

Rows keep their order through the writer (the shuffle comes at finalize); row i gets the
made-up provenance token i % 50 at position i % 10 of sequence i // 10.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kukla.storage import StoreWriter, finalize_store


def write_store(path: Path, columns: dict[str, np.ndarray], *, segments: int = 2, holdout_rows: int | None = None,
                finalize: bool = True, dtype: str = "float32", meta: dict[str, Any] | None = None,
                chunk_rows: int | None = None, memory_budget_bytes: int = 2 << 30) -> Path:
    """A store of `columns` ({hook: [rows, width]}) written in `segments` segments, then finalized
    (a small `memory_budget_bytes` makes finalize write one chunk per shard)."""
    n_rows = len(next(iter(columns.values())))
    hooks = {hook: rows.shape[1] for hook, rows in columns.items()}
    writer = StoreWriter.open(path, {"hooks": hooks, **(meta or {})}, dtype=dtype, chunk_rows=chunk_rows)
    bounds = np.linspace(0, n_rows, segments + 1).astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        ids = np.arange(lo, hi)
        writer.write_segment(i, {**{f"acts/{hook}": rows[lo:hi] for hook, rows in columns.items()},
                                 "tokens/token_id": (ids % 50).astype(np.int32),
                                 "tokens/sequence": (ids // 10).astype(np.int64),
                                 "tokens/position": (ids % 10).astype(np.int32)})
    writer.finish()
    writer.close()
    if finalize:
        finalize_store(path, holdout_rows=holdout_rows, memory_budget_bytes=memory_budget_bytes)
    return path
