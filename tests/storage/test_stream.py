"""ActivationStream: rank shares, exact resume, epochs, held-out rows, batches that match the store."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kukla.errors import KuklaError
from kukla.storage import ActivationStream, batches_per_epoch, open_store

HOOK, OUT = "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"


def _rows(stream: ActivationStream) -> list[list[int]]:
    return [batch.rows.tolist() for batch in stream]


def test_batches_hold_the_store_rows_they_name(make_store) -> None:
    store = open_store(make_store())
    stream = ActivationStream(store, [HOOK, OUT], 24, with_rows=True, dtype=torch.float64)
    batches = list(stream)
    assert len(batches) == batches_per_epoch(store, 24) == (store.n_rows - store.holdout_rows) // 24
    for batch in batches:
        x, y = batch.acts
        assert x.dtype == torch.float64 and x.shape == (24, 8) and y.shape == (24, 4)
        assert torch.equal(x, store.read(HOOK)[batch.rows].double())
        assert torch.equal(y[:, 0], -x[:, 0])  # input and target rows stay aligned


def test_truth_arrays_stream_beside_the_hooks_row_for_row(make_store) -> None:
    """A toy source's ground truth is read like any hook: same rows, same order, requested dtype."""
    store = open_store(make_store())
    for batch in ActivationStream(store, [HOOK, "truth/row"], 24, with_rows=True, split="all", drop_last=False):
        x, truth = batch.acts
        assert truth.dtype == torch.float32 and torch.equal(truth, x[:, 0])  # the row id, from both arrays
        assert torch.equal(truth.long(), store.read("truth/row")[batch.rows])
    with pytest.raises(KuklaError, match="no truth/missing; its truth arrays: truth/row"):
        ActivationStream(store, [HOOK, "truth/missing"], 8)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_shares_split_every_global_batch_of_one_process(make_store, world: int) -> None:
    store = open_store(make_store(n_seq=10, ctx=16))
    for drop_last in (True, False):
        whole = _rows(ActivationStream(store, [HOOK], 7 * world, with_rows=True, drop_last=drop_last, seed=3))
        shares = [_rows(ActivationStream(store, [HOOK], 7, rank=rank, world=world, with_rows=True,
                                         drop_last=drop_last, seed=3)) for rank in range(world)]
        # rank r holds rows [7r, 7r + 7) of each global batch, so any world size trains on the same batches
        rebuilt = [sum((share[j] for share in shares if j < len(share)), []) for j in range(len(whole))]
        assert rebuilt == whole
        if drop_last:  # every rank yields the same number of batches (DDP)
            assert {len(share) for share in shares} == {len(whole)}
    assert sorted(sum(whole, [])) == list(range(store.n_rows - store.holdout_rows))


def test_resume_from_cursor_yields_exactly_the_remaining_batches(make_store) -> None:
    store = open_store(make_store())
    full = _rows(ActivationStream(store, [HOOK], 10, epochs=3, with_rows=True, seed=5))
    for stop_after in [0, 3, len(full) // 3, len(full) // 3 + 1, len(full) - 1]:
        stream = ActivationStream(store, [HOOK], 10, epochs=3, with_rows=True, seed=5)
        head = [batch.rows.tolist() for batch in itertools.islice(stream, stop_after)]
        state = stream.state_dict()
        resumed = ActivationStream(store, [HOOK], 10, epochs=3, with_rows=True, seed=5)
        resumed.load_state_dict(state)
        assert len(resumed) == len(full) - stop_after
        assert head + _rows(resumed) == full


def test_each_epoch_covers_the_split_in_a_fresh_order(make_store) -> None:
    store = open_store(make_store(n_seq=16, ctx=16))
    per_epoch = batches_per_epoch(store, 16, drop_last=False)
    batches = _rows(ActivationStream(store, [HOOK], 16, epochs=2, with_rows=True, drop_last=False))
    first, second = sum(batches[:per_epoch], []), sum(batches[per_epoch:], [])
    assert sorted(first) == sorted(second) == list(range(store.n_rows - store.holdout_rows))
    assert first != second


def test_holdout_split_is_disjoint_from_train(make_store) -> None:
    store = open_store(make_store(holdout_rows=37))
    train = set(sum(_rows(ActivationStream(store, [HOOK], 8, with_rows=True, drop_last=False)), []))
    held = sum(_rows(ActivationStream(store, [HOOK], 8, split="holdout", with_rows=True, drop_last=False)), [])
    assert len(held) == 37 and not train & set(held)
    assert len(train) + len(held) == store.n_rows


def test_unknown_hook_error_lists_the_store_hooks(make_store) -> None:
    store = open_store(make_store())
    with pytest.raises(KuklaError, match="blocks.0.hook_resid_post, blocks.0.hook_mlp_out"):
        ActivationStream(store, ["blocks.9.hook_resid_post"], 8)


def test_stream_cursor_from_other_settings_is_refused(make_store) -> None:
    store = open_store(make_store())
    state = ActivationStream(store, [HOOK], 8).state_dict()
    with pytest.raises(KuklaError, match="batch_size"):
        ActivationStream(store, [HOOK], 16).load_state_dict(state)


def test_abandoned_iteration_stops_the_prefetch_thread(make_store) -> None:
    import threading

    store = open_store(make_store())
    before = threading.active_count()
    for _ in range(3):
        for batch in ActivationStream(store, [HOOK], 4, prefetch=1):
            break
    assert threading.active_count() <= before + 1
    assert np.isfinite(batch.acts[0].numpy()).all()


def _damage(path, key: str, offset: int) -> None:
    """Flip one byte of a stored object, as a bad disk or a bad copy would."""
    with open(path / key, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_missing_shard_is_refused_not_read_as_zeros(make_store) -> None:
    path = make_store()
    store = open_store(path)
    lo, hi = store.arrays[f"acts/{HOOK}"].shards[0], 2 * store.arrays[f"acts/{HOOK}"].shards[0]
    (path / f"acts/{HOOK}/c/1/0").unlink()
    expected = rf"acts/{HOOK} rows {lo}-{hi - 1} are missing .* run `kukla store verify"
    with pytest.raises(KuklaError, match=expected):
        open_store(path).read(HOOK)
    with pytest.raises(KuklaError, match=expected):
        list(ActivationStream(open_store(path), [HOOK], 16))
    assert open_store(path).read(OUT).shape[0] == store.n_rows  # the other hook is intact and still reads


def test_damaged_chunk_is_refused_and_named(make_store) -> None:
    path = make_store()
    intact = open_store(path).read(HOOK)
    _damage(path, f"acts/{HOOK}/c/0/0", 5)  # inside the first chunk's rows
    store = open_store(path)
    with pytest.raises(KuklaError, match=rf"acts/{HOOK} rows 0-15 are damaged \(checksum mismatch\)"):
        store.read(HOOK, 0, 4)
    assert torch.equal(store.read(HOOK, 16, 48), intact[16:48])  # neighbouring chunks still read exactly
    with pytest.raises(KuklaError, match="checksum mismatch.*kukla store verify"):
        list(ActivationStream(store, [HOOK], 16, epochs=1))
    size = (path / f"acts/{HOOK}/c/0/0").stat().st_size
    _damage(path, f"acts/{HOOK}/c/0/0", size - 10)  # inside the shard's index
    with pytest.raises(KuklaError, match="shard index checksum mismatch"):
        open_store(path).read(HOOK, 16, 32)


@pytest.mark.parametrize("codec", ["zstd-1", "blosc-lz4-5-shuffle"])
def test_compressed_and_zarr_written_stores_read_exactly(make_store, codec: str) -> None:
    """Stores in every codec, and stores whose shards zarr itself wrote (all stores before kukla
    wrote shards directly), read the same rows through kukla and through zarr."""
    import zarr

    raw = open_store(make_store(name="raw", codec="none"))
    path = make_store(name="packed", codec=codec)
    for name in raw.specs:
        ours = open_store(path).read_stored(name)
        np.testing.assert_array_equal(ours, raw.read_stored(name))
        array = zarr.open_array(str(path / name), mode="r+")
        np.testing.assert_array_equal(array[...], ours)  # zarr reads the shards kukla wrote
        array[...] = ours[::-1].copy()  # now zarr writes them, as it did for older stores
        np.testing.assert_array_equal(open_store(path).read_stored(name), ours[::-1])
    batch = next(iter(ActivationStream(open_store(path), [HOOK], 16, with_rows=True, dtype=torch.float64)))
    assert torch.equal(batch.acts[0], open_store(path).read(HOOK)[batch.rows].double())


def test_an_epoch_holds_its_chunk_order_and_makes_the_chunks_as_it_reads_them(make_store) -> None:
    """An epoch's chunks were a list of row ranges (~0.5 byte a row at Gemma's 512-row chunks, per
    epoch and rank); now the epoch holds only its seeded order and makes each range as it is read.
    The ranges and their order are the ones earlier versions streamed, so a cursor saved by one
    resumes the same batches."""
    store = open_store(make_store(n_seq=17, ctx=16, holdout_rows=37))
    chunk = store.chunk_rows
    for split in ("train", "holdout", "all"):
        stream = ActivationStream(store, [HOOK], 8, split=split, seed=4)
        lo, hi = stream.rows.start, stream.rows.stop
        edges = [lo, *range((lo // chunk + 1) * chunk, hi, chunk), hi]
        ranges = list(zip(edges[:-1], edges[1:]))
        blocks = stream.blocks(2)
        assert not isinstance(blocks, (list, tuple)) and len(ranges) > 1
        assert list(blocks) == [ranges[i] for i in np.random.default_rng([4, 2]).permutation(len(ranges))]
