"""StoreWriter: dtypes round-trip, bad values refused, one writer per part, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kukla.errors import KuklaError
from kukla.storage import StoreWriter, finalize_store, open_store

HOOKS = {"h": 16}


def _write(path: Path, x: torch.Tensor | np.ndarray, dtype: str) -> None:
    with StoreWriter.open(path, {"hooks": HOOKS}, dtype=dtype, chunk_rows=64) as writer:
        writer.write_segment(0, {"acts/h": x})
        writer.finish()
    finalize_store(path, holdout_rows=0)


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                               ("float32", torch.float32)])
def test_activations_round_trip_in_each_store_dtype(tmp_path: Path, dtype: str, torch_dtype: torch.dtype) -> None:
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(0)) * 30
    _write(tmp_path / dtype, x, dtype)
    store = open_store(tmp_path / dtype)
    assert store.dtype == torch_dtype
    back = store.read("acts/h")
    assert back.dtype == torch_dtype
    # rows are shuffled: compare as sets of rows, against torch's own rounding
    expected = x.to(torch_dtype).float()
    assert sorted(map(tuple, back.float().tolist())) == sorted(map(tuple, expected.tolist()))


def test_bf16_tensors_are_stored_bit_exact(tmp_path: Path) -> None:
    x = torch.randn(50, 16).to(torch.bfloat16)
    _write(tmp_path / "s", x, "bfloat16")
    back = open_store(tmp_path / "s").read("h")
    assert sorted(back.view(torch.int16).flatten().tolist()) == sorted(x.view(torch.int16).flatten().tolist())


def test_fp16_overflow_is_refused(tmp_path: Path) -> None:
    x = torch.zeros(4, 16)
    x[2, 3] = 70000.0
    with pytest.raises(KuklaError, match="beyond float16's range"):
        _write(tmp_path / "s", x, "float16")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_activations_are_refused(tmp_path: Path, bad: float) -> None:
    x = torch.zeros(4, 16)
    x[1, 1] = bad
    with pytest.raises(KuklaError, match="NaN or inf"):
        _write(tmp_path / "s", x, "bfloat16")


def test_second_live_writer_of_a_part_is_refused(tmp_path: Path) -> None:
    with StoreWriter.open(tmp_path / "s", {"hooks": HOOKS}):
        with pytest.raises(KuklaError, match="is in use by process"):
            StoreWriter.open(tmp_path / "s", {"hooks": HOOKS})
    StoreWriter.open(tmp_path / "s", {"hooks": HOOKS}).close()  # released: the next run may resume


def test_other_runs_store_is_refused_unless_overwrite(tmp_path: Path) -> None:
    StoreWriter.open(tmp_path / "s", {"hooks": HOOKS, "model": "a"}).close()
    with pytest.raises(KuklaError, match="different run"):
        StoreWriter.open(tmp_path / "s", {"hooks": HOOKS, "model": "b"})
    with StoreWriter.open(tmp_path / "s", {"hooks": HOOKS, "model": "b"}, overwrite=True) as writer:
        assert writer.committed == set()


def test_the_refusal_of_another_run_names_the_entry_that_differs(tmp_path: Path) -> None:
    """The run's entries were cut to 120 characters each: a local dataset's size, its last key,
    was left out, so the error showed the same text "there" and "now"."""
    dataset = {"name": "texts.jsonl", "local": True, "subset": None, "split": "train", "revision": None,
               "text_column": "text", "bytes": 30984}
    StoreWriter.open(tmp_path / "s", {"hooks": HOOKS, "dataset": dataset}).close()
    with pytest.raises(KuklaError, match=r"different run \(dataset\.bytes: 30984 there, 31023 now\)"):
        StoreWriter.open(tmp_path / "s", {"hooks": HOOKS, "dataset": dataset | {"bytes": 31023}})


def test_resumed_writer_knows_committed_segments(tmp_path: Path) -> None:
    with StoreWriter.open(tmp_path / "s", {"hooks": HOOKS}) as writer:
        writer.write_segment(0, {"acts/h": np.ones((3, 16))})
        writer.write_segment(2, {"acts/h": np.ones((3, 16))})
    with StoreWriter.open(tmp_path / "s", {"hooks": HOOKS}) as writer:
        assert writer.committed == {0, 2}
        with pytest.raises(KuklaError, match="already committed"):
            writer.write_segment(2, {"acts/h": np.ones((3, 16))})


def test_unfinalized_store_is_refused_by_readers_unless_allowed(tmp_path: Path) -> None:
    with StoreWriter.open(tmp_path / "s", {"hooks": HOOKS}) as writer:
        writer.write_segment(0, {"acts/h": np.ones((3, 16))})
    with pytest.raises(KuklaError, match="not finalized"):
        open_store(tmp_path / "s")
    assert open_store(tmp_path / "s", allow_unfinalized=True).read("h").shape == (3, 16)


def test_mismatched_segment_rows_and_unknown_hooks_are_refused(tmp_path: Path) -> None:
    with StoreWriter.open(tmp_path / "s", {"hooks": HOOKS}) as writer:
        with pytest.raises(KuklaError, match="different row counts"):
            writer.write_segment(0, {"acts/h": np.ones((3, 16)), "tokens/position": np.zeros(2)})
        with pytest.raises(KuklaError, match="its hooks: h"):
            writer.write_segment(0, {"acts/h": np.ones((3, 16)), "acts/g": np.ones((3, 16))})


@pytest.mark.parametrize("extreme", [-50.0, 50.0])
def test_hook_stats_match_an_independent_computation(tmp_path: Path, extreme: float) -> None:
    x = torch.randn(200, 16) * torch.linspace(0.5, 4, 200)[:, None]
    x[7, 3] = extreme  # the largest magnitude, negative or positive
    _write(tmp_path / "s", x, "float32")
    stats = open_store(tmp_path / "s").hook_stats("h")
    norms = x.double().norm(dim=1)
    assert stats["mean_norm"] == pytest.approx(norms.mean().item(), rel=1e-6)
    assert stats["rms_norm"] == pytest.approx(norms.square().mean().sqrt().item(), rel=1e-6)
    assert stats["max_abs"] == 50.0
    assert stats["scale"] == pytest.approx(4.0 / norms.mean().item(), rel=1e-6)


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_url_store_round_trips(tmp_path: Path, scheme: str) -> None:
    import uuid

    url = f"memory://kukla-test-{uuid.uuid4().hex}/store" if scheme == "memory" else f"file://{tmp_path}/store"
    x = np.arange(40 * 16, dtype=np.float32).reshape(40, 16)
    with StoreWriter.open(url, {"hooks": HOOKS}, dtype="float32", chunk_rows=64) as writer:
        writer.write_segment(0, {"acts/h": x[:25]})
        writer.write_segment(1, {"acts/h": x[25:]})
        with pytest.raises(KuklaError, match="is in use by process"):
            StoreWriter.open(url, {"hooks": HOOKS}, dtype="float32", chunk_rows=64)
        writer.finish()
    finalize_store(url, holdout_rows=4)
    back = open_store(url).read("h").numpy()
    assert sorted(back[:, 0].tolist()) == x[:, 0].tolist()
    from kukla.storage.store import verify_store

    assert verify_store(url) == []


def test_a_full_disk_in_static_or_finish_gives_the_one_line_resume_message(tmp_path: Path, monkeypatch) -> None:
    import errno

    from kukla.storage.location import Location

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with StoreWriter.open(tmp_path / "s", {"hooks": HOOKS}, dtype="float32", chunk_rows=64) as writer:
        writer.write_segment(0, {"acts/h": np.zeros((8, 16), np.float32)})
        monkeypatch.setattr(Location, "put_json", full)
        with pytest.raises(KuklaError, match="disk full while finishing rank 0.*rerun the same command"):
            writer.finish()
        monkeypatch.setattr(Location, "make_durable", full)
        with pytest.raises(KuklaError, match="disk full while writing static/d.*rerun the same command"):
            writer.put_static("static/d", np.ones(3))


def test_static_arrays_survive_finalize_and_read_back(tmp_path: Path) -> None:
    directions = np.arange(12, dtype=np.float32).reshape(3, 4)
    with StoreWriter.open(tmp_path / "s", {"hooks": HOOKS}, dtype="float32", chunk_rows=64) as writer:
        writer.put_static("static/directions", directions)
        writer.write_segment(0, {"acts/h": np.zeros((8, 16), np.float32)})
        writer.finish()
    finalize_store(tmp_path / "s", holdout_rows=0)
    store = open_store(tmp_path / "s")
    np.testing.assert_array_equal(store.read("static/directions").numpy(), directions)
    np.testing.assert_array_equal(store.read_stored("static/directions", 1, 3), directions[1:3])
    with pytest.raises(KuklaError, match="no array 'static/missing'"):
        store.read("static/missing")


def test_rows_read_in_any_order_across_chunks_are_the_rows_read_one_by_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 1000  # chunks of 64 rows: 16 chunks, the last one partial
    writer = StoreWriter.open(tmp_path / "s.zarr", {"hooks": {"h": 4}, "source": "test"}, dtype="bfloat16",
                              chunk_rows=64)
    writer.write_segment(0, {"acts/h": rng.standard_normal((n, 4)).astype(np.float32),
                             "tokens/token_id": rng.integers(0, 99, n), "tokens/sequence": np.arange(n) // 10,
                             "tokens/position": np.arange(n) % 10})
    writer.finish()
    writer.close()
    finalize_store(tmp_path / "s.zarr", holdout_rows=0)
    store = open_store(tmp_path / "s.zarr")
    asked = np.concatenate([rng.integers(0, n, 300), [n - 1, 0, n - 1], np.arange(60, 70)])  # repeats, chunk edges
    for name in ("h", "tokens/token_id", "tokens/position"):
        one_by_one = torch.cat([store.read(name, int(r), int(r) + 1) for r in asked])
        got = store.read_rows(name, asked)
        assert got.dtype == one_by_one.dtype and torch.equal(got, one_by_one)
    assert store.read_rows("h", np.empty(0, np.int64)).shape == (0, 4)


def test_a_writer_keeps_each_committed_segments_manifest_row_not_its_journal_entry(tmp_path: Path) -> None:
    """A journal entry (each array's size and checksum, statistics, windows) is ~6 KB a segment; the
    writer keeps the manifest's few numbers of each, new or resumed, and writes the same manifest."""
    import pyarrow.parquet as pq

    def write(segments: range, finish: bool) -> StoreWriter:
        with StoreWriter.open(tmp_path / "s", {"hooks": {"h": 4}}) as writer:
            for s in segments:
                writer.write_segment(s, {"acts/h": np.full((3, 4), s, np.float32), "tokens/sequence": np.full(3, s)})
            if finish:
                writer.finish()
        return writer

    write(range(3), finish=False)
    writer = write(range(3, 5), finish=True)  # resumed: three segments from the journal, two new
    assert writer.journal == {s: {"segment": s, "rank": 0, "rows": 3, "first_sequence": s, "last_sequence": s}
                              for s in range(5)}
    manifest = pq.read_table(tmp_path / "s" / "_parts" / "rank-00000" / "manifest.parquet").to_pydict()
    assert manifest["segment"] == list(range(5)) and manifest["rows"] == [3] * 5
