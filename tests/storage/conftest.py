"""Small real stores on disk for the storage tests: every row carries its own id, so a
test can tell exactly which rows came back and whether hooks stayed aligned."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from kukla.storage import DEFAULT_CODEC, StoreWriter, finalize_store

HOOKS = {"blocks.0.hook_resid_post": 8, "blocks.0.hook_mlp_out": 4}


def id_rows(ids: np.ndarray, sequence: np.ndarray, position: np.ndarray) -> dict[str, np.ndarray]:
    """Rows whose every array encodes the row id (exact in fp32 and in bf16 up to 256)."""
    n = len(ids)
    x = np.random.default_rng(int(ids[0]) if n else 0).standard_normal((n, 8)).astype(np.float32)
    x[:, 0] = ids
    y = np.zeros((n, 4), np.float32)
    y[:, 0] = -ids
    return {"acts/blocks.0.hook_resid_post": x, "acts/blocks.0.hook_mlp_out": y,
            "tokens/token_id": ids, "tokens/sequence": sequence, "tokens/position": position,
            "truth/row": ids.astype(np.int64)}


def write_sequences(path: Path | str, n_seq: int, ctx: int, *, per_segment: int = 4, dtype: str = "float32",
                    rank: int = 0, world: int = 1, finish: bool = True, codec: str = DEFAULT_CODEC) -> int:
    """Write sequences [rank::world] of length ctx, `per_segment` sequences per segment, each
    also given as its window (token ids = row ids)."""
    mine = list(range(rank, n_seq, world))
    with StoreWriter.open(path, {"model": "toy", "hooks": HOOKS, "context_size": ctx}, rank=rank, world=world,
                          dtype=dtype, chunk_rows=16, codec=codec) as writer:
        for segment, start in enumerate(range(0, len(mine), per_segment)):
            seqs = np.array(mine[start:start + per_segment])
            sequence = np.repeat(seqs, ctx)
            position = np.tile(np.arange(ctx), len(seqs))
            windows = {"windows/sequence": seqs, "windows/token_id": seqs[:, None] * ctx + np.arange(ctx)}
            if segment not in writer.committed:
                writer.write_segment(segment, id_rows(sequence * ctx + position, sequence, position) | windows)
        if finish:
            writer.finish()
    return len(mine) * ctx


def store_state(path: Path) -> str:
    """The store's state: writing, finalizing or finalized."""
    return json.loads((path / "zarr.json").read_text())["attributes"]["kukla"]["state"]


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store and its bytes: two stores are the same store when these are equal."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120.0) -> None:
    """Return as soon as `ready()` holds; the process must still be running then."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"finished too early: {proc.communicate()}"
        assert time.time() < deadline, "timed out waiting for the process"
        time.sleep(0.005)


@pytest.fixture
def make_store(tmp_path: Path) -> Callable[..., Path]:
    """A finalized store of n_seq × ctx id rows (fp32, so ids up to 2**24 are exact)."""

    def make(n_seq: int = 16, ctx: int = 16, *, budget: int = 1 << 16, seed: int = 0, name: str = "store",
             holdout_rows: int | None = None, codec: str = DEFAULT_CODEC) -> Path:
        path = tmp_path / name
        write_sequences(path, n_seq, ctx, codec=codec)
        finalize_store(path, memory_budget_bytes=budget, seed=seed, holdout_rows=holdout_rows)
        return path

    return make
