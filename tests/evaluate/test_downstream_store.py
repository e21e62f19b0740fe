"""Downstream metrics through `evaluate` on a store harvested from a real (tiny, random) model."""

from __future__ import annotations

import base64
import gzip
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from kukla.pipeline.dictionary import Dictionary, DictionaryConfig, save_dictionary
from kukla.pipeline.evaluate import AbsorptionConfig, DownstreamConfig, EvaluateConfig, evaluate
from kukla.storage import finalize_store
from tests.evaluate.helpers import make_dictionary
from tests.harvest.conftest import harvest_tiny_text

RESID = "blocks.0.hook_resid_post"
MID, MLP_OUT = "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def text_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("text")
    store, _, model_dir = harvest_tiny_text(root, [RESID, MID, MLP_OUT], n_docs=300, context_size=16, tokens=1200,
                                            finalize=False, segment_windows=16)
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


def _browser_pages(report: Path) -> dict[tuple[int, int], list[dict]]:
    html = (report / "report.html").read_text()
    found = re.findall(r'<script type="application/octet-stream" id="page-(\d+)-(\d+)">(.*?)</script>', html, re.S)
    return {(int(d), int(p)): json.loads(gzip.decompress(base64.b64decode(text))) for d, p, text in found}


@pytest.mark.slow
def test_logit_lens_is_the_saved_decoder_times_the_unembedding(tmp_path: Path, text_store: tuple[Path, Path]) -> None:
    """A dictionary trained at scale s keeps W_dec in training units; the lens must read the saved
    (raw) rows, the logit change one unit of the latent makes, not s times it."""
    store, model_dir = text_store
    g = torch.Generator().manual_seed(0)
    sae = Dictionary(DictionaryConfig(d_in=32, width=16, arch="relu"))
    sae.set_scales(0.25)  # input_scale = √32 / 0.25
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(16, 32, generator=g), dim=1))
        sae.W_enc.copy_(sae.W_dec.T)
    path = save_dictionary(sae, tmp_path / "scaled", {"hooks": {"input": RESID}})
    out = evaluate(EvaluateConfig(dictionaries=[path], store=store, out=tmp_path / "report",
                                  downstream=DownstreamConfig(contexts=4, batch_size=4, require=True),
                                  absorption=AbsorptionConfig(enabled=False)))
    saved = load_file(path / "sae_weights.safetensors")["W_dec"].double()
    w_u = GPT2LMHeadModel.from_pretrained(model_dir).lm_head.weight.detach().double().T
    logits = saved @ w_u
    for latent, page in enumerate(_browser_pages(out)[(0, 0)]):
        ids = [token for token, _ in page["lens_top"]]
        assert ids == logits[latent].argsort(descending=True)[:len(ids)].tolist()
        assert [v for _, v in page["lens_top"]] == pytest.approx(logits[latent, ids].tolist(), rel=5e-3)
