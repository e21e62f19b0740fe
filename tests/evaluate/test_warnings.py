"""Warnings beside the numbers: calibration rows among the scored rows, samples too small to compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kukla.pipeline.dictionary import (Dictionary, DictionaryConfig, calibrate_threshold, calibration_rows, evaluation_rows,
                                      save_dictionary)
from kukla.pipeline.evaluate import AbsorptionConfig, DownstreamConfig, EvaluateConfig, evaluate
from kukla.pipeline.evaluate.report import caveats
from kukla.storage import open_store
from tests.evaluate.helpers import D, HOOK, write_rows_store


def _batchtopk(path: Path, store_path: Path, calibration: list[int] | None) -> Path:
    store = open_store(store_path)
    d = Dictionary(DictionaryConfig(d_in=D, width=16, k=2, arch="batchtopk"))
    d.set_scales(float(store.read(HOOK, 0, 1000).norm(dim=1).mean()))
    d.initialize(store.read(HOOK, 0, 1000))
    calibrate_threshold(d, [store.read(HOOK, 0, 500)])
    metadata = {"hooks": {"input": HOOK}, "store": {"fingerprint": store.fingerprint, "identity": store.identity_digest}}
    if calibration is not None:
        metadata["calibration"] = {"rows": calibration, "store_fingerprint": store.fingerprint}
    return save_dictionary(d, path, metadata)


def test_calibration_rows_among_the_scored_rows_are_stated(tmp_path: Path, rows_store: Path) -> None:
    store = open_store(rows_store)
    split, scored = calibration_rows(store), evaluation_rows(store)
    dicts = [_batchtopk(tmp_path / "new", rows_store, [split.start, split.stop]),
             _batchtopk(tmp_path / "overlapping", rows_store, [scored.start, scored.start + 100]),
             _batchtopk(tmp_path / "old", rows_store, None)]
    out = evaluate(EvaluateConfig(dictionaries=dicts, store=rows_store, out=tmp_path / "report",
                                  downstream=DownstreamConfig(enabled=False),
                                  absorption=AbsorptionConfig(enabled=False)))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["store"]["eval_rows"] == [scored.start, scored.stop]
    warnings = {name: m["warnings"] for name, m in metrics["dictionaries"].items()}
    assert not any("calibrat" in w for w in warnings["new"])
    assert any("100 of the scored rows also calibrated" in w for w in warnings["overlapping"])
    assert any("older kukla" in w for w in warnings["old"])
    assert any(w.startswith("EV, FVU and L0 from only 500 eval tokens") for w in warnings["new"])
    report = (out / "report.md").read_text()
    assert "> warning (overlapping): L0 and EV: 100 of the scored rows" in report


def test_a_dictionary_scored_on_another_store_than_it_trained_on_is_warned_of(tmp_path: Path, rows_store: Path) -> None:
    """Another store's held-out rows need not be unseen (the same text harvested again), and the
    dictionary's calibration rows are rows of its own store, not of this one."""
    store = open_store(rows_store)
    split = calibration_rows(store)
    path = _batchtopk(tmp_path / "d", rows_store, [split.start, split.stop])
    other = write_rows_store(tmp_path / "other.zarr", np.random.default_rng(5).standard_normal((3000, D)).astype(np.float32),
                             holdout_rows=1000)
    for scored_on, warned in ((rows_store, False), (other, True)):
        out = evaluate(EvaluateConfig(dictionaries=[path], store=scored_on, out=tmp_path / f"report-{warned}",
                                      downstream=DownstreamConfig(enabled=False), absorption=AbsorptionConfig(enabled=False)))
        entry = json.loads((out / "metrics.json").read_text())["dictionaries"]["d"]
        assert any(w.startswith("held-out rows: the dictionary was trained on another store") for w in entry["warnings"]) == warned
        assert entry["calibration_rows"] == (None if warned else [split.start, split.stop])


def test_weak_splices_thin_samples_and_a_model_mismatch_get_warnings_that_name_the_metric() -> None:
    m = {"width": 4096, "reconstruction": {"n_tokens": 2000, "dead_latents": 300, "massive_variance_share": 0.38,
                                           "massive_rows_excluded": 3, "explained_variance_without_massive": 0.52,
                                           "l0_tail": {"p99": 60, "p99.9": 900, "max": 1400}},
         "downstream": {"contexts": 4, "context_size": 128, "ce_loss_clean": 2.1, "ce_loss_spliced": 6.8,
                        "delta_lm_loss": 4.7, "ce_loss_mean_ablation": 5.5, "ce_loss_recovered_mean_ablation": -0.38,
                        "ce_loss_recovered_zero_ablation": 0.76},
         "absorption": {"letters_kept": 11, "letters_total": 26}}
    meta = {"config": {"k": 32},  # kukla.json's shape: the trainer's figures under `metadata`
            "metadata": {"model_name": "gpt2", "dead_window": {"tokens": 10_000_000, "engaged": False}}}
    warnings = caveats(m, meta, {"model": {"name": "google/gemma-3-270m"}})
    starts = [w.split(":")[0].split(" from")[0] for w in warnings]
    assert starts == ["dead latents counted on only 2,000 eval tokens", "EV, FVU and L0", "CE recovered and KL",
                      "CE recovered and KL against mean ablation", "hook/model mismatch", "explained variance", "L0", "dead latents", "CE loss recovered -0.38 against mean ablation",
                      "absorption"]
    assert any("38% of the eval variance; without them EV is 0.520" in w for w in warnings)
    assert any("from 2.10 to 6.80 nats/token (ΔLM 4.70)" in w and "(5.50)" in w for w in warnings)
    assert any("aux-k never engaged" in w for w in warnings)
    assert any("only 11 of 26 letters" in w for w in warnings)
    plenty = {"reconstruction": {"n_tokens": 2_000_000, "dead_latents": 3}, "downstream": {"contexts": 64}}
    assert caveats(plenty, {"metadata": {"model_name": "gpt2"}}, {"model": {"name": "gpt2"}}) == []
    saelens = {"hooks": {}, "saelens": {"metadata": {"model_name": "gpt2"}}}  # a plain SAELens directory
    assert [w.split(":")[0] for w in caveats(plenty, saelens, {"model": {"name": "pythia-70m"}})] == ["hook/model mismatch"]


def test_a_saelens_directory_is_named_as_such_beside_its_numbers(tmp_path: Path, rows_store: Path) -> None:
    """SAELens records no kukla store: the report says where the dictionary came from, and that its
    training text may be among the scored rows, instead of passing it as trained on this store."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=16, metadata=SAEMetadata(
        hook_name=HOOK, model_name="tiny", dataset_path="stories.jsonl", training_architecture="standard")))
    sae.save_model(tmp_path / "saelens")
    out = evaluate(EvaluateConfig(dictionaries=[tmp_path / "saelens"], store=rows_store, out=tmp_path / "report",
                                  downstream=DownstreamConfig(enabled=False), absorption=AbsorptionConfig(enabled=False)))
    warnings = json.loads((out / "metrics.json").read_text())["dictionaries"]["saelens"]["warnings"]
    [origin] = [w for w in warnings if w.startswith("held-out rows: a SAELens directory")]
    assert "model_name tiny" in origin and "dataset_path stories.jsonl" in origin
    assert origin in (out / "report.md").read_text()
