"""The global shuffle: every row exactly once, hooks aligned, order uniformly mixed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kukla.errors import KuklaError
from kukla.storage import finalize_store, open_store, unfinished_ranks

from .conftest import store_files, store_state, write_sequences  # noqa: TID252


def _ids(path: Path) -> np.ndarray:
    store = open_store(path)
    x = store.read("blocks.0.hook_resid_post").numpy()
    y = store.read("blocks.0.hook_mlp_out").numpy()
    ids = store.read("tokens/token_id").numpy()
    np.testing.assert_array_equal(x[:, 0], ids)
    np.testing.assert_array_equal(y[:, 0], -ids)
    np.testing.assert_array_equal(store.read("truth/row").numpy(), ids)
    ctx = 16
    np.testing.assert_array_equal(store.read("tokens/sequence").numpy() * ctx + store.read("tokens/position").numpy(), ids)
    return ids


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_seq=st.integers(1, 24), budget_kib=st.sampled_from([64, 96, 256, 4096]), world=st.integers(1, 3))
def test_shuffle_keeps_every_row_once_with_hooks_aligned(tmp_path_factory: pytest.TempPathFactory, n_seq: int,
                                                          budget_kib: int, world: int) -> None:
    path = tmp_path_factory.mktemp("s") / "store"
    for rank in range(world):
        write_sequences(path, n_seq, 16, rank=rank, world=world, per_segment=6)
    finalize_store(path, memory_budget_bytes=budget_kib << 10, seed=n_seq)
    ids = _ids(path)
    assert sorted(ids.tolist()) == list(range(n_seq * 16))


def test_small_budget_forces_many_buckets_and_still_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "store"
    write_sequences(path, 64, 16)
    finalize_store(path, memory_budget_bytes=64 << 10)
    assert open_store(path).meta["shuffle_buckets"] >= 8  # the budget really split the rows into buckets
    assert sorted(_ids(path).tolist()) == list(range(1024))


def test_positions_end_up_mixed(tmp_path: Path) -> None:
    """Unshuffled or chunk-shuffled stores keep neighbours from one sequence; a uniform shuffle does not."""
    path = tmp_path / "store"
    n_seq, ctx = 64, 16
    write_sequences(path, n_seq, ctx)
    finalize_store(path, memory_budget_bytes=64 << 10, seed=1)
    seq = open_store(path).read("tokens/sequence").numpy()
    ids = open_store(path).read("tokens/token_id").numpy()
    same_neighbour = float(np.mean(seq[1:] == seq[:-1]))
    assert same_neighbour < 3 / n_seq  # uniform: ~1/64; unshuffled: 15/16; chunks of 16 permuted: ~15/16
    n = len(ids)
    rank_corr = np.corrcoef(np.arange(n), ids)[0, 1]
    assert abs(rank_corr) < 4 / np.sqrt(n)
    # Each quarter of the store holds about a quarter of every position.
    counts = np.array([np.bincount(ids[q * n // 4:(q + 1) * n // 4] % ctx, minlength=ctx) for q in range(4)])
    expected = n / 4 / ctx
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 100  # 45 degrees of freedom: p ≈ 1e-5 at 100


def test_same_seed_gives_same_store_and_other_seed_another(tmp_path: Path, make_store) -> None:
    a = open_store(make_store(name="a", seed=3)).read("tokens/token_id")
    b = open_store(make_store(name="b", seed=3)).read("tokens/token_id")
    c = open_store(make_store(name="c", seed=4)).read("tokens/token_id")
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_finalize_refuses_until_every_rank_finished(tmp_path: Path) -> None:
    path = tmp_path / "store"
    write_sequences(path, 8, 16, rank=0, world=2)
    write_sequences(path, 8, 16, rank=1, world=2, finish=False)
    assert unfinished_ranks(path) == [1]
    with pytest.raises(KuklaError, match="rank 1 of 2 has not finished"):
        finalize_store(path)


def test_holdout_tail_is_recorded(make_store) -> None:
    store = open_store(make_store(n_seq=16, ctx=16))
    assert store.n_rows == 256 and store.holdout_rows == 2  # 1% of 256
    assert open_store(make_store(name="h", holdout_rows=40)).holdout_rows == 40


def test_finalize_split_across_worker_processes_is_byte_identical(tmp_path: Path) -> None:
    """Three real worker processes at once, then the commit step, give exactly the store one
    finalize gives with the same seed: every file, byte for byte."""
    import subprocess
    import sys

    single, split = tmp_path / "single", tmp_path / "split"
    for path in (single, split):
        for rank in range(2):
            write_sequences(path, 24, 16, rank=rank, world=2, per_segment=3)
    finalize_store(single, memory_budget_bytes=64 << 10, seed=7)
    repo = Path(__file__).resolve().parents[2]
    code = ("import sys; from kukla.storage import finalize_worker; "
            "finalize_worker(sys.argv[1], int(sys.argv[2]), 3, memory_budget_bytes=64 << 10, seed=7)")
    workers = [subprocess.Popen([sys.executable, "-c", code, str(split), str(i)], cwd=repo,
                                stderr=subprocess.PIPE, text=True) for i in range(3)]
    for proc in workers:
        assert proc.wait(timeout=300) == 0, proc.communicate()[1]
    shards = list((split / "_finalize" / "shards").iterdir())
    assert store_state(split) == "finalizing" and len(shards) >= 3
    finalize_store(split, memory_budget_bytes=64 << 10, seed=7)  # the commit step: nothing left but to commit
    assert store_files(split) == store_files(single)
    assert {"windows/token_id/zarr.json", "windows/row/zarr.json"} <= set(store_files(single))  # the windows too
    assert sorted(_ids(split).tolist()) == list(range(24 * 16))


def test_a_finalize_resumed_with_another_memory_budget_plans_for_it_while_the_parts_remain(tmp_path: Path) -> None:
    """Rerun with a smaller budget (say, after an out-of-memory kill), finalize must work in that
    budget: it kept the first plan, so the store was the first budget's, silently."""
    from kukla.storage import finalize_worker

    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    for path in (resumed, fresh):
        write_sequences(path, 48, 64, per_segment=8)
    finalize_worker(resumed, 0, 1, memory_budget_bytes=1 << 20, seed=3)  # both passes, uncommitted, parts kept
    finalize_store(resumed, memory_budget_bytes=64 << 10, seed=3)
    finalize_store(fresh, memory_budget_bytes=64 << 10, seed=3)
    assert open_store(resumed).meta["shuffle_buckets"] > 1
    assert store_files(resumed) == store_files(fresh)


def test_resumed_finalize_refuses_a_damaged_run_file(tmp_path: Path) -> None:
    from kukla.storage import finalize_worker

    path = tmp_path / "store"
    write_sequences(path, 16, 16)
    finalize_worker(path, 0, 1, memory_budget_bytes=64 << 10)  # both passes, not committed
    for marker in (path / "_finalize" / "shards").iterdir():  # as if killed before pass 2
        marker.unlink()
    run = path / "_finalize" / "runs" / "run-000000" / "acts" / "blocks.0.hook_resid_post.bin"
    data = bytearray(run.read_bytes())
    data[40] ^= 0x01
    run.write_bytes(bytes(data))
    with pytest.raises(KuklaError, match=r"run-000000/acts/blocks.0.hook_resid_post.bin is damaged \(checksum"):
        finalize_store(path, memory_budget_bytes=64 << 10)
    assert store_state(path) == "finalizing"  # never finalized with bad rows


def test_runs_past_the_page_cache_give_the_store_a_buffered_finalize_gives(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs written and read with O_DIRECT (aligned spans, staged reads, truncated tails) and through
    the page cache (what a file system without O_DIRECT gets) make the same store, byte for byte."""
    trees = []
    for name in ["direct", "buffered"]:
        if name == "buffered":
            monkeypatch.delattr("os.O_DIRECT")
        path = tmp_path / name
        write_sequences(path, 37, 16, per_segment=5)  # rows that are no multiple of a 4 KiB page
        finalize_store(path, memory_budget_bytes=96 << 10, seed=3)
        assert open_store(path).meta["shuffle_buckets"] > 1
        trees.append(store_files(path))
    assert trees[0] == trees[1]


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_direct_put_writes_exactly_the_bytes_and_leaves_no_temp(tmp_path: Path, size: int) -> None:
    from kukla.storage.location import Location, aligned_buffer

    buffer = aligned_buffer(size)
    buffer[:] = np.random.default_rng(size).integers(0, 256, buffer.size, dtype=np.uint8)
    Location(tmp_path).put_direct("runs/run.bin", buffer, size)
    assert (tmp_path / "runs" / "run.bin").read_bytes() == buffer[:size].tobytes()
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["run.bin"]


def test_pass_two_reads_where_each_bucket_lies_a_block_of_buckets_at_a_time(tmp_path: Path) -> None:
    """Where bucket b lies in run k, and its checksum per array, is one entry per (run, bucket):
    n_runs · n_buckets of them, quadratic in rows / budget (held whole as the commits' lists, 25 GB
    at 10⁹ Gemma rows under 2 GiB). Pass 2 holds a block of buckets' entries within 1/16 of the
    budget, and each entry is the one its run committed."""
    from kukla.storage.finalize import _plan
    from kukla.storage.format import Attributes
    from kukla.storage.location import Location
    from kukla.storage.shuffle import _Runs, array_layouts, scatter

    path, budget = tmp_path / "store", 64 << 10
    write_sequences(path, 256, 16, per_segment=16)
    location = Location(path)
    plan = _plan(location, Attributes.read(location), budget, 0, None, worker=None)
    scatter(location, plan, 0, 1)
    names = [layout.spec.name for layout in array_layouts(Attributes.read(location).value, plan)]
    commits = [json.loads((path / "_finalize" / "runs" / f"run-{k:06d}.json").read_text())
               for k in range(math.ceil(plan["n_rows"] / plan["run_rows"]))]
    runs = _Runs(location, plan, names)
    assert len(commits) > 10 and plan["n_buckets"] > 3 * runs.block_buckets  # several runs and blocks
    for b in range(plan["n_buckets"]):
        pieces = runs.pieces_of(b)
        assert runs.block.nbytes <= budget // 16
        assert pieces["rows"].tolist() == [c["counts"][b] for c in commits]
        assert pieces["start"].tolist() == [sum(c["counts"][:b]) for c in commits]
        assert pieces["crc32c"].tolist() == [[c["crc32c"][name][b] for name in names] for c in commits]
    runs.close()
