"""The toy-tree source: rows are truth · directions + noise, and children fire only with parents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kukla.errors import KuklaError
from kukla.pipeline.harvest import TOY_HOOK, HarvestConfig, ToyTree, harvest
from kukla.pipeline.harvest.config import ToyConfig
from kukla.storage import open_store


def _toy(out: Path, **overrides) -> HarvestConfig:
    settings = dict(output=str(out), source="toy-tree", tokens=3000, segment_windows=4,
                    toy=ToyConfig(tree=[6, 3, 2], dim=64, p_root=0.3, p_child=0.5, noise=0.02), context_size=128,
                    store_dtype="float32", seed=3)
    return HarvestConfig(**(settings | overrides))


def test_toy_rows_are_true_activity_times_directions_plus_noise(tmp_path: Path) -> None:
    config = _toy(tmp_path / "toy.zarr")
    harvest(config)
    store = open_store(config.output)
    rows = store.read(f"acts/{TOY_HOOK}").numpy()
    activity = store.read("truth/toy_activity").numpy()
    directions = store.read("static/toy_directions").numpy()
    parent = store.read("static/toy_parent").numpy()
    assert rows.shape == (3000, 64) and activity.shape == (3000, 6 + 18 + 36)

    residual = rows - activity @ directions
    assert abs(residual.std() - 0.02) < 0.002  # exactly the configured noise is left over
    np.testing.assert_allclose(directions @ directions.T, np.eye(60), atol=1e-5)  # 60 ≤ 64: orthonormal
    fires = activity > 0
    child = parent >= 0
    assert not (fires[:, child] & ~fires[:, parent[child]]).any(), "a child fired without its parent"
    assert abs(fires[:, ~child].mean() - 0.3) < 0.03
    conditional = fires[:, child].sum() / fires[:, parent[child]].sum()
    assert abs(conditional - 0.5) < 0.05
    active = activity[fires]
    assert abs(active.mean() - 1.0) < 0.05  # magnitudes around 1
    np.testing.assert_array_equal(store.read("static/toy_level").numpy()[[0, 6, 24]], [0, 1, 2])
    assert store.meta["toy"]["tree"] == [6, 3, 2] and store.meta["source"] == "toy-tree"


def test_toy_rows_do_not_depend_on_the_rank_split(tmp_path: Path) -> None:
    one = _toy(tmp_path / "one.zarr")
    harvest(one)
    two = [_toy(tmp_path / "two.zarr", rank=r, world=2, finalize=r == 0) for r in (1, 0)]
    for config in two:
        harvest(config)

    def sorted_rows(path: str) -> np.ndarray:
        store = open_store(path)
        both = np.concatenate([store.read(f"acts/{TOY_HOOK}").numpy(), store.read("truth/toy_activity").numpy()], 1)
        return both[np.lexsort(both.T[::-1])]

    np.testing.assert_array_equal(sorted_rows(one.output), sorted_rows(two[0].output))


def test_more_features_than_dimensions_get_nearly_orthogonal_unit_directions() -> None:
    tree = ToyTree.build([50, 4], dim=128, p_root=0.1, p_child=0.3, noise=0.0, magnitude_std=0.1, seed=0)
    gram = tree.directions @ tree.directions.T
    np.testing.assert_allclose(np.diag(gram), 1.0, rtol=1e-5)
    assert np.abs(gram - np.eye(250)).max() < 0.5
    rows, activity = tree.sample(100, np.random.default_rng(0))
    np.testing.assert_allclose(rows, activity @ tree.directions, atol=1e-5)  # no noise: exact


def test_toy_tree_flags_reach_the_store_through_the_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kukla.cli.app import app

    out = tmp_path / "cli.zarr"
    result = CliRunner().invoke(app, ["harvest", str(out), "--source", "toy-tree", "--tokens", "500",
                                      "--toy-tree", "4,2", "--toy-dim", "16", "--toy-p-root", "0.5"])
    assert result.exit_code == 0, result.output
    store = open_store(str(out))
    assert store.n_rows == 500 and store.hooks == {TOY_HOOK: 16}
    assert store.meta["toy"]["tree"] == [4, 2] and store.meta["toy"]["p_root"] == 0.5
    assert store.read("truth/toy_activity").shape == (500, 12)


def test_held_out_rows_are_set_at_harvest_and_must_leave_training_rows(tmp_path: Path) -> None:
    config = _toy(tmp_path / "held.zarr", tokens=1000, holdout_rows=250)
    harvest(config)
    assert open_store(config.output).holdout_rows == 250

    with pytest.raises(KuklaError, match="holdout_rows: must be at least 0 and below tokens"):  # before any rows
        _toy(tmp_path / "all.zarr", tokens=1000, holdout_rows=1000)
