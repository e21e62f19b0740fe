"""Fixtures: a real finalized store of offset Gaussian rows (held-out tail: 1000 rows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.evaluate.helpers import D, write_rows_store


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    g = np.random.default_rng(0)
    return (g.standard_normal((3000, D)) * np.linspace(0.5, 3, D) + 20.0).astype(np.float32)


@pytest.fixture(scope="module")
def rows_store(tmp_path_factory: pytest.TempPathFactory, rows: np.ndarray) -> Path:
    return write_rows_store(tmp_path_factory.mktemp("store") / "rows.zarr", rows, holdout_rows=1000)
