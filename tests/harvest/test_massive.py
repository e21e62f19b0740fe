"""Massive-activation flags: `tokens/massive` marks the rows far above the reference median norm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import pytest

from kukla.errors import ConfigError
from kukla.pipeline.harvest import HarvestConfig, harvest
from kukla.pipeline.massive import MASSIVE_RULE
from kukla.storage import open_store

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def test_rows_above_ratio_times_the_first_segments_median_are_flagged(config_model, texts: Path, tmp_path: Path,
                                                                      store_rows) -> None:
    read_rows, _ = store_rows
    out = str(tmp_path / "s.zarr")
    ratio, segment_windows = 1.25, 4
    harvest(HarvestConfig(output=out, dataset=str(texts), hook=HOOKS, context_size=24, tokens=600,
                          segment_windows=segment_windows, batch_size=3, store_dtype="float32", massive_ratio=ratio),
            model=config_model)
    rows = read_rows(out)
    norms = np.stack([np.linalg.norm(rows[f"acts/{h}"].astype(np.float64), axis=1) for h in HOOKS], axis=1)
    reference = rows["tokens/sequence"] < segment_windows  # the planned rows of segment 0, wherever shuffled
    median = np.median(norms[reference], axis=0)
    expected = (norms > ratio * median).any(axis=1)
    flags = rows["tokens/massive"]
    assert flags.dtype == np.uint8 and set(np.unique(flags)) <= {0, 1}
    assert 0 < expected.sum() < len(expected), "the ratio must split the rows for the test to mean anything"
    np.testing.assert_array_equal(flags.astype(bool), expected)
    assert open_store(out).meta["massive"] == {"ratio": ratio, "rule": MASSIVE_RULE, "array": "tokens/massive"}


def test_no_ratio_writes_no_flags_and_the_store_says_so(config_model, texts: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "s.zarr")
    harvest(HarvestConfig(output=out, dataset=str(texts), hook=HOOKS[:1], context_size=24, tokens=200,
                          massive_ratio=None), model=config_model)
    store = open_store(out)
    assert "tokens/massive" not in store.specs and store.meta["massive"] is None
    with pytest.raises(ConfigError, match="massive_ratio: must be above 1"):
        HarvestConfig(output=out, dataset=str(texts), hook=HOOKS[:1], massive_ratio=0.5)


def test_training_with_massive_skip_never_sees_a_flagged_row(config_model, texts: Path, tmp_path: Path) -> None:
    from kukla.pipeline.massive import massive_rows
    from kukla.pipeline.train import TrainConfig, train
    from kukla.pipeline.train.loop import without_rows
    from kukla.storage import ActivationStream

    out = str(tmp_path / "s.zarr")
    harvest(HarvestConfig(output=out, dataset=str(texts), hook=HOOKS[:1], context_size=24, tokens=600,
                          segment_windows=4, batch_size=3, massive_ratio=1.25), model=config_model)
    store = open_store(out)
    flagged = massive_rows(store)
    train_rows = store.n_rows - store.holdout_rows
    assert 0 < int((flagged < train_rows).sum()) < train_rows, "the ratio must flag some training rows"

    seen = []
    for batch in ActivationStream(store, HOOKS[:1], 32, with_rows=True, drop_last=False):
        kept = without_rows(batch, flagged)
        assert kept.acts[0].shape[0] == kept.rows.shape[0]
        seen.append(kept.rows)
    seen_rows = set(torch.cat(seen).tolist())
    assert seen_rows == set(range(train_rows)) - set(flagged.tolist())  # every unflagged row once, no flagged one

    (path,) = train(TrainConfig(store=Path(out), out=tmp_path / "d", hook=HOOKS[0], arch="batchtopk", width=[32],
                                k=[4.0], tokens=640, batch_size=64, massive="skip", calibration_tokens=64,
                                threads=1))
    assert (path / "sae_weights.safetensors").exists()
