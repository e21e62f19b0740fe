"""Stores shared by the trainer's tests (written once per session: writing and shuffling cost seconds)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from stores import write_store  # noqa: E402

HOOK = "blocks.0.hook_resid_post"
TARGET = "blocks.0.hook_mlp_out"


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4096 rows (512 held out) of a 16-wide hook and a 12-wide target hook."""
    return write_store(tmp_path_factory.mktemp("store") / "s.zarr", 4096, {HOOK: 16, TARGET: 12})
