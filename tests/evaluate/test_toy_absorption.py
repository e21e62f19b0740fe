"""Toy ground truth: BatchTopK absorbs parents into children; Matryoshka keeps them whole.

The toy-tree store has 4 parents with 4 children each; a child fires only with its parent.
Both dictionaries are trained by the real trainer for the same tokens on the same store.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kukla.pipeline.dictionary import evaluation_rows, load_dictionary
from kukla.pipeline.evaluate import EvaluateConfig, evaluate
from kukla.pipeline.harvest.config import HarvestConfig, ToyConfig
from kukla.pipeline.harvest.run import harvest
from kukla.pipeline.train import train
from kukla.pipeline.train.config import TrainConfig
from kukla.storage import finalize_store, open_store


def _holes_by_hand(store_path: Path, dictionary_dir: Path) -> dict[int, float]:
    """Absorption holes recomputed from the raw arrays: matched latent by max decoder cosine,
    then the share of rows with the parent and a child active where that latent is silent."""
    store = open_store(store_path)
    lo = evaluation_rows(store).start  # the rows evaluate scores
    x = store.read("toy", lo)
    activity = store.read("truth/toy_activity", lo).numpy() > 0
    directions = store.read("static/toy_directions").numpy().astype(np.float64)
    parent = store.read("static/toy_parent").numpy()
    dictionary = load_dictionary(dictionary_dir)
    codes = dictionary.encode(x).detach().numpy()
    w_dec = dictionary.W_dec.detach().numpy().astype(np.float64)
    cos = (directions / np.linalg.norm(directions, axis=1, keepdims=True)) @ (
        w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)).T
    holes = {}
    for p in np.flatnonzero(parent < 0):
        both = activity[:, p] & activity[:, parent == p].any(1)
        holes[int(p)] = float((codes[both, cos[p].argmax()] == 0).mean())
    return holes


@pytest.mark.slow
def test_batchtopk_shows_absorption_holes_and_matryoshka_clearly_fewer(tmp_path: Path) -> None:
    store = tmp_path / "toy.zarr"
    harvest(HarvestConfig(output=store, source="toy-tree", tokens=60_000, store_dtype="float32", finalize=False,
                          toy=ToyConfig(tree=[4, 4], dim=32, p_root=0.25, p_child=0.3)))
    finalize_store(store, holdout_rows=4000)
    dictionaries = []
    for arch, levels in (("batchtopk", None), ("matryoshka-batchtopk", [4, 20])):
        dictionaries += train(TrainConfig(store=store, out=tmp_path / arch, hook="toy", width=[20], k=[2.0],
                                          arch=arch, levels=levels, tokens=200_000, batch_size=512,
                                          init_tokens=4096, calibration_tokens=4096, checkpoint_every=0,
                                          device="cpu"))
    out = evaluate(EvaluateConfig(dictionaries=dictionaries, store=store, out=tmp_path / "report"))
    metrics = json.loads((out / "metrics.json").read_text())["dictionaries"]
    plain, matryoshka = (metrics[Path(d).name]["toy"] for d in dictionaries)
    assert plain["mean_absorption_holes"] > 0.15
    assert matryoshka["mean_absorption_holes"] < 0.05
    assert all(latent < 4 for latent in matryoshka["matched_latent"][:4]), "parents live in the first level"
    for entry, directory in zip((plain, matryoshka), dictionaries):
        by_hand = _holes_by_hand(store, directory)
        assert entry["absorption_holes"] == pytest.approx({str(p): h for p, h in by_hand.items()}, abs=1e-9)
    assert "Toy ground truth" in (out / "report.html").read_text()


def test_a_toy_store_has_no_massive_activations_to_warn_of(tmp_path: Path) -> None:
    """Where most toy rows are noise, the rows carrying features are many times the median norm: the
    norm rule flagged them ("347 massive-activation rows hold 100% of the eval variance")."""
    import torch

    from tests.evaluate.helpers import make_dictionary

    store = tmp_path / "toy.zarr"
    harvest(HarvestConfig(output=store, source="toy-tree", tokens=20_000, store_dtype="float32",
                          toy=ToyConfig(tree=[8, 2], dim=32, p_root=0.05, p_child=0.3), holdout_rows=4000))
    g = torch.Generator().manual_seed(0)
    path = make_dictionary(tmp_path / "d", torch.randn(32, 16, generator=g), torch.randn(16, 32, generator=g), hook="toy")
    out = evaluate(EvaluateConfig(dictionaries=[path], store=store, out=tmp_path / "report"))
    report = json.loads((out / "metrics.json").read_text())
    assert report["store"]["massive"]["rows"] == {"toy": 0} and report["store"]["massive"]["rule"].startswith("none")
    assert not any(w.startswith("massive") for w in report["dictionaries"]["d"]["warnings"])
