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
