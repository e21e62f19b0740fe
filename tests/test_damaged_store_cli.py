"""A store damaged on disk (a shard file deleted, a byte flipped in a chunk) stops `kukla train`
and `kukla evaluate` with exit 2 and one line naming the array and rows and pointing at
`kukla store verify`: no traceback, no asyncio noise, also when the damage is met in the
training stream's background thread or in evaluate's reads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kukla.cli.app import app
from kukla.storage.store import verify_store
from tests.stores import write_store

REPO = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_post"
ROWS, CHUNK_ROWS, HOLDOUT = 4096, 256, 512  # one 256-row chunk per shard (small memory budget)
TRAIN = ["--hook", HOOK, "--arch", "topk", "--width", "32", "--k", "4", "--batch-size", "128",
         "--tokens", str(128 * 16), "--init-tokens", "256", "--threads", "1"]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finalized 16-shard store and a dictionary trained on it."""
    root = tmp_path_factory.mktemp("damage")
    x = np.random.default_rng(0).standard_normal((ROWS, 16)).astype(np.float32)
    store = write_store(root / "s.zarr", {HOOK: x}, segments=1, holdout_rows=HOLDOUT, meta={"model": "test-rows"},
                        chunk_rows=CHUNK_ROWS, memory_budget_bytes=64 << 10)
    result = CliRunner().invoke(app, ["train", str(store), *TRAIN, "--out", str(root / "dicts")])
    assert result.exit_code == 0, result.output
    return store, root / "dicts" / "topk-w32-k4-s0"


def _damaged(good_store: Path, tmp_path: Path, how: str, shard: int) -> Path:
    store = tmp_path / f"{how}.zarr"
    shutil.copytree(good_store, store)
    shard_file = store / "acts" / HOOK / "c" / str(shard) / "0"
    assert shard_file.exists()
    if how == "deleted":
        shard_file.unlink()
    else:  # the first byte of the shard's first chunk: still decodes as numbers without its checksum
        data = bytearray(shard_file.read_bytes())
        data[0] ^= 0x40
        shard_file.write_bytes(bytes(data))
    assert verify_store(store), "verify must see the damage"
    return store


def _kukla(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kukla", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def _assert_one_line(run: subprocess.CompletedProcess, store: Path, rows: str) -> None:
    lines = [line for line in run.stderr.splitlines() if line.strip() and "%|" not in line]  # no progress bars
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert f"acts/{HOOK}" in lines[0] and rows in lines[0] and "kukla store verify" in lines[0], lines[0]
    for noise in ("Traceback", "asyncio", "Exception", "ValueError"):
        assert noise not in run.stderr, run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["deleted", "flipped"])
def test_damage_stops_train_and_evaluate_in_one_line_naming_array_and_rows(
        good: tuple[Path, Path], tmp_path: Path, how: str) -> None:
    good_store, dictionary = good
    # train's stream thread reads shard 5 (its initialisation reads shard 0 only); evaluate reads the
    # last, held-out, shard
    for shard, command in ((5, "train"), (ROWS // CHUNK_ROWS - 1, "evaluate")):
        store = _damaged(good_store, tmp_path / command, how, shard)
        rows = f"rows {shard * CHUNK_ROWS}"
        if command == "train":
            run = _kukla("train", store, *TRAIN, "--out", tmp_path / "out")
        else:
            run = _kukla("evaluate", dictionary, "--store", store, "--out", tmp_path / "report",
                         "--no-downstream", "--no-absorption")
        _assert_one_line(run, store, rows)
