"""Downstream metrics through `evaluate` on a store harvested from a real (tiny, random) model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from kukla.pipeline.dictionary import Dictionary, DictionaryConfig, save_dictionary
from kukla.pipeline.evaluate import DownstreamConfig, EvaluateConfig, evaluate
from kukla.pipeline.harvest.config import HarvestConfig
from kukla.pipeline.harvest.run import harvest
from kukla.storage import finalize_store
from tests.evaluate.helpers import make_dictionary
from tests.harvest.conftest import build_tiny_model_dir, write_texts

RESID = "blocks.0.hook_resid_post"
MID, MLP_OUT = "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def text_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("text")
    model_dir = build_tiny_model_dir(root / "model")
    texts = write_texts(root / "texts.jsonl", n_docs=300)
    store = root / "store.zarr"
    harvest(HarvestConfig(output=store, model=str(model_dir), hook=[RESID, MID, MLP_OUT], dataset=str(texts),
                          context_size=16, tokens=1200, store_dtype="float32", finalize=False, segment_windows=16))
    finalize_store(store, holdout_rows=400)
    return store, model_dir


@pytest.mark.slow
def test_ce_recovered_is_one_for_the_identity_and_zero_for_zero_ablation_through_evaluate(
        tmp_path: Path, text_store: tuple[Path, Path]) -> None:
    store, _ = text_store
    d = 32
    eye = torch.eye(d)
    identity = make_dictionary(tmp_path / "identity", torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0), hook=RESID)
    zero = make_dictionary(tmp_path / "zero", torch.zeros(d, 8), torch.zeros(8, d), b_enc=-torch.ones(8), hook=RESID)
    silent_transcoder = Dictionary(DictionaryConfig(d_in=d, width=8, arch="relu", transcoder=True, d_out=d))
    save_dictionary(silent_transcoder, tmp_path / "transcoder", {"hooks": {"input": MID, "target": MLP_OUT}})

    out = evaluate(EvaluateConfig(dictionaries=[identity, zero, tmp_path / "transcoder"], store=store,
                                  out=tmp_path / "report",
                                  downstream=DownstreamConfig(contexts=12, batch_size=4, require=True)))
    report = json.loads((out / "metrics.json").read_text())
    m = report["dictionaries"]
    assert m["identity"]["downstream"]["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert m["identity"]["downstream"]["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert m["zero"]["downstream"]["ce_loss_recovered_zero_ablation"] == pytest.approx(0.0, abs=1e-9)
    for entry in m.values():  # mean ablation is the default baseline, reported first
        d = entry["downstream"]
        assert d["baseline"] == "mean ablation" and d["ce_loss_recovered"] == d["ce_loss_recovered_mean_ablation"]
    # The transcoder predicts zero at mlp_out: it is spliced at its output hook, so its CE is
    # that hook's zero ablation, which differs from zero-ablating the SAE's hook.
    t = m["transcoder"]["downstream"]
    assert t["ce_loss_recovered_zero_ablation"] == pytest.approx(0.0, abs=1e-9)
    assert t["ce_loss_zero_ablation"] != pytest.approx(m["zero"]["downstream"]["ce_loss_zero_ablation"])
    assert "ce_loss_recovered_mean_ablation" in t
    assert m["identity"]["downstream"]["contexts"] == 12
    assert not any("include harvested text" in n for n in report["notes"])
    contexts = pq.read_table(out / "latents_identity.parquet").to_pydict()["top_contexts"]
    assert any("«" in c for latent in contexts for c in latent)
