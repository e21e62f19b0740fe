"""Small real stores for the trainer's tests: written with StoreWriter, finalized (shuffled) on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kukla.storage import StoreWriter, finalize_store


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
    writer = StoreWriter.open(path, {"hooks": hooks, "model": "test-rows"}, dtype=dtype)
    bounds = np.linspace(0, n_rows, segments + 1).astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        seq = np.arange(lo, hi, dtype=np.int64)
        writer.write_segment(i, {**{f"acts/{n}": c[lo:hi] for n, c in columns.items()},
                                 "tokens/token_id": np.zeros(hi - lo, np.int32), "tokens/sequence": seq,
                                 "tokens/position": np.zeros(hi - lo, np.int32)})
    writer.finish()
    writer.close()
    if finalize:
        finalize_store(path, holdout_rows=holdout_rows)
    return path
