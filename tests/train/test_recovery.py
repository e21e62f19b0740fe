"""On a toy store with known hierarchical features, Matryoshka BatchTopK learns the true directions."""

from __future__ import annotations

from pathlib import Path

import pytest

from kukla.pipeline.dictionary import load_dictionary
from kukla.pipeline.harvest.config import HarvestConfig, ToyConfig
from kukla.pipeline.harvest.run import harvest
from kukla.pipeline.train import TrainConfig, train
from kukla.storage import open_store


@pytest.mark.slow
def test_matryoshka_batchtopk_recovers_the_toy_tree_directions(tmp_path: Path) -> None:
    # 8 parents with 4 children each (40 features) in 48 dimensions; ~1.9 active per row
    store = harvest(HarvestConfig(output=tmp_path / "toy.zarr", source="toy-tree", tokens=16384, store_dtype="float32",
                                  toy=ToyConfig(tree=[8, 4], dim=48, p_root=0.15, p_child=0.1)))
    [path] = train(TrainConfig(store=store, out=tmp_path / "run", hook="toy", arch="matryoshka-batchtopk",
                               width=[48], k=[1.9], levels=[8, 48], batch_size=512, tokens=512 * 1000, lr=0.01,
                               dead_tokens=20_000, checkpoint_every=0, log_every=100, threads=1))
    s = open_store(store)
    truth = s.read("static/toy_directions").float()
    decoder = load_dictionary(path).W_dec
    cosines = truth @ (decoder / decoder.norm(dim=1, keepdim=True)).T
    best = cosines.max(dim=1).values
    assert best.mean() >= 0.95, best
    roots = s.read("static/toy_parent") < 0
    assert best[roots].mean() >= 0.95  # parents are not absorbed into their children
