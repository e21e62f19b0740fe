"""windows/token_id and windows/row: each row's window and the inverse of the global shuffle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kukla.errors import KuklaError
from kukla.storage import StoreWriter, finalize_store, open_store
from kukla.storage.importer import import_arrays

from .conftest import write_sequences  # noqa: TID252

CTX = 12


def _gappy_store(path: Path, n_windows: int, *, world: int = 2, budget: int = 1 << 16) -> np.ndarray:
    """Windows of random ids whose position 0 (a BOS) and a random fifth of the rest are not
    stored, written by `world` ranks; returns the ids [n_windows, CTX] the writer was given."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 1000, (n_windows, CTX))
    keep = rng.random((n_windows, CTX)) > 0.2
    keep[:, 0] = False
    for rank in range(world):
        mine = np.arange(rank, n_windows, world)
        with StoreWriter.open(path, {"hooks": {"h": 4}, "context_size": CTX}, rank=rank, world=world,
                              dtype="float32", chunk_rows=16) as writer:
            for segment, seqs in enumerate(np.array_split(mine, 3)):
                w, p = np.nonzero(keep[seqs])
                writer.write_segment(segment, {
                    "acts/h": rng.standard_normal((len(w), 4)).astype(np.float32),
                    "tokens/token_id": ids[seqs][w, p], "tokens/sequence": seqs[w], "tokens/position": p,
                    "windows/sequence": seqs, "windows/token_id": ids[seqs]})
            writer.finish()
    finalize_store(path, memory_budget_bytes=budget, seed=3)
    return ids


@pytest.mark.parametrize("budget", [1 << 16, 1 << 24])  # 3 slabs (and shards) of windows, and 1
def test_window_rows_are_a_bijection_onto_the_stored_rows(tmp_path: Path, budget: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row once, where its sequence and position say, whether a slab's scan of the rows is one
    read or several (a read's scratch, 48 bytes a row, stays within a quarter of the budget: 1,024
    rows at a time under 64 KiB, where 2²⁰ rows cost 45 MB)."""
    from kukla.storage.shards import ShardReader

    reads, read_into = [], ShardReader.read_into

    def noting(self: ShardReader, lo: int, hi: int, out: np.ndarray) -> None:
        if self.layout.spec.name == "tokens/sequence":
            reads.append(hi - lo)
        read_into(self, lo, hi, out)

    monkeypatch.setattr(ShardReader, "read_into", noting)
    given = _gappy_store(tmp_path / "s", 1200, budget=budget)
    n_rows = open_store(tmp_path / "s").n_rows
    assert max(reads) == (1024 if budget == 1 << 16 else n_rows) and n_rows > 8 * 1024
    store = open_store(tmp_path / "s")
    rows, ids = store.read("windows/row").numpy(), store.read("windows/token_id").numpy()
    seq, pos = store.read("tokens/sequence").numpy(), store.read("tokens/position").numpy()
    assert store.n_windows == 1200 and rows.shape == ids.shape == (1200, CTX)
    shards = len(list((tmp_path / "s" / "windows" / "row" / "c").iterdir()))
    assert shards == (3 if budget == 1 << 16 else 1)
    stored = rows[rows >= 0]
    assert np.array_equal(np.sort(stored), np.arange(store.n_rows))  # every row once, nothing else
    assert np.array_equal(rows[seq, pos], np.arange(store.n_rows))  # and each where its row says
    assert (rows[:, 0] == -1).all() and (rows >= 0).sum() == store.n_rows  # unstored positions: −1
    assert np.array_equal(ids, given)  # every window whole, the unstored tokens too
    assert np.array_equal(ids[seq, pos], store.read("tokens/token_id").numpy())


def test_a_store_without_windows_reads_as_one_without_them(tmp_path: Path) -> None:
    """Older stores (and writers that give no windows) open; their windows are simply absent."""
    with StoreWriter.open(tmp_path / "s", {"hooks": {"h": 4}}, dtype="float32") as writer:
        writer.write_segment(0, {"acts/h": np.ones((10, 4), np.float32)})
        writer.finish()
    finalize_store(tmp_path / "s")
    store = open_store(tmp_path / "s")
    assert store.n_windows == 0 and not store.window_specs and store.context_size is None
    with pytest.raises(KuklaError, match="no array 'windows/row'"):
        store.read("windows/row")


def test_old_stores_keep_their_context_size_under_harvest(tmp_path: Path) -> None:
    with StoreWriter.open(tmp_path / "s", {"hooks": {"h": 4}, "harvest": {"context_size": 64}}, dtype="float32") as w:
        w.write_segment(0, {"acts/h": np.ones((10, 4), np.float32)})
        w.finish()
    finalize_store(tmp_path / "s")
    assert open_store(tmp_path / "s").context_size == 64


def test_windows_of_another_width_or_in_some_segments_only_are_refused(tmp_path: Path) -> None:
    acts = {"acts/h": np.ones((4, 4), np.float32)}
    with StoreWriter.open(tmp_path / "s", {"hooks": {"h": 4}, "context_size": 4}, dtype="float32") as writer:
        with pytest.raises(KuklaError, match=r"expected \(1, 4\)"):
            writer.write_segment(0, acts | {"windows/sequence": np.array([0]), "windows/token_id": np.zeros((1, 5))})
        writer.write_segment(0, acts | {"windows/sequence": np.array([0]), "windows/token_id": np.zeros((1, 4))})
        with pytest.raises(KuklaError, match="every segment or with none"):
            writer.write_segment(1, acts)


def test_rows_outside_their_windows_stop_finalize(tmp_path: Path) -> None:
    with StoreWriter.open(tmp_path / "s", {"hooks": {"h": 4}, "context_size": 4}, dtype="float32") as writer:
        writer.write_segment(0, {"acts/h": np.ones((2, 4), np.float32), "tokens/sequence": np.array([0, 1]),
                                 "tokens/position": np.array([0, 0]), "windows/sequence": np.array([0]),
                                 "windows/token_id": np.array([[1, 2, 3, 4]])})
        writer.finish()
    with pytest.raises(KuklaError, match="sequence 1, position 0, outside the 1 windows"):
        finalize_store(tmp_path / "s")


def test_an_import_with_token_ids_keeps_each_sequence_as_its_window(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((30, CTX, 8)).astype(np.float32)
    acts[4, 7, 0] = np.nan  # dropped: its position has no row
    ids = rng.integers(0, 500, (30, CTX)).astype(np.int64)
    np.save(tmp_path / "acts.npy", acts)
    np.save(tmp_path / "ids.npy", ids)
    import_arrays(tmp_path / "s", {"h": str(tmp_path / "acts.npy")}, tokens=tmp_path / "ids.npy", model="gpt2",
                  dtype="float32", drop_nonfinite=True, rows_per_segment=64)
    store = open_store(tmp_path / "s")
    rows, seq, pos = store.read("windows/row").numpy(), store.read("tokens/sequence").numpy(), \
        store.read("tokens/position").numpy()
    assert np.array_equal(store.read("windows/token_id").numpy(), ids)
    assert rows[4, 7] == -1 and (rows >= 0).sum() == store.n_rows == 30 * CTX - 1
    assert np.array_equal(rows[seq, pos], np.arange(store.n_rows))
    assert np.array_equal(store.read("acts/h").numpy(), acts[seq, pos])  # each row is its (sequence, position)
    assert store.meta["model"] == {"name": "gpt2"} and store.context_size == CTX


def test_import_refuses_token_ids_that_do_not_fit_the_activations(tmp_path: Path) -> None:
    np.save(tmp_path / "acts.npy", np.ones((3, 5, 8), np.float32))
    np.save(tmp_path / "ids.npy", np.ones((3, 4), np.int64))
    with pytest.raises(KuklaError, match=r"leading dims \[sequences, context_size\], here \(3, 5\)"):
        import_arrays(tmp_path / "s", {"h": str(tmp_path / "acts.npy")}, tokens=tmp_path / "ids.npy")


def test_the_shared_test_stores_carry_whole_windows(tmp_path: Path) -> None:
    write_sequences(tmp_path / "s", 6, 5)
    finalize_store(tmp_path / "s", memory_budget_bytes=1 << 16)
    store = open_store(tmp_path / "s")
    rows = store.read("windows/row").numpy()
    assert np.array_equal(store.read("truth/row").numpy()[rows], np.arange(30).reshape(6, 5))


def test_a_damaged_window_shard_fails_verify_and_reads(tmp_path: Path) -> None:
    from kukla.storage.store import verify_store

    _gappy_store(tmp_path / "s", 10)
    shard = tmp_path / "s" / "windows" / "row" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("windows/row rows 0-" in problem for problem in verify_store(tmp_path / "s"))
    with pytest.raises(KuklaError, match="checksum mismatch"):
        open_store(tmp_path / "s").read("windows/row")
