"""The trainer's test rows: sparse sums of fixed directions, written through the shared `tests/stores.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.stores import write_store as write_columns


def sparse_rows(n_rows: int, dim: int, n_features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows that are sparse sums of fixed unit directions (so a dictionary has something to learn)."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_features, dim)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    active = rng.random((n_rows, n_features)) < 4 / n_features
    rows = (active * rng.uniform(0.5, 1.5, (n_rows, n_features))).astype(np.float32) @ directions
    return rows + 0.01 * rng.standard_normal((n_rows, dim)).astype(np.float32), directions


def write_store(path: Path, n_rows: int = 4096, hooks: dict[str, int] | None = None, *,
                segments: int = 4, holdout_rows: int = 512, finalize: bool = True, seed: int = 0,
                dtype: str = "float32") -> Path:
    """A finalized store with the given hooks {name: width}; the second hook is a fixed map of the first."""
    hooks = hooks or {"blocks.0.hook_resid_post": 16}
    names = list(hooks)
    x, _ = sparse_rows(n_rows, hooks[names[0]], 4 * hooks[names[0]], seed)
    columns = {names[0]: x}
    for name in names[1:]:  # a target hook: a nonlinear function of the input
        w = np.random.default_rng(seed + 1).standard_normal((hooks[names[0]], hooks[name])).astype(np.float32)
        columns[name] = np.maximum(x @ w, 0) / np.sqrt(hooks[names[0]])
    return write_columns(path, columns, segments=segments, holdout_rows=holdout_rows, finalize=finalize,
                         dtype=dtype, meta={"model": "test-rows"})
