"""The dictionary directory: our round trip, SAELens loading it, and us loading SAELens'."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

from kukla.errors import KuklaError
from kukla.pipeline.dictionary import (Dictionary, DictionaryConfig, calibrate_threshold, load_dictionary,
                                       save_dictionary)

HOOKS_SAE = {"input": "blocks.1.hook_resid_post", "target": None}
HOOKS_TC = {"input": "blocks.1.ln2.hook_normalized", "target": "blocks.1.hook_mlp_out"}


def _trained_like(arch: str, transcoder: bool, seed: int = 0) -> tuple[Dictionary, torch.Tensor]:
    """A dictionary with non-trivial weights and activation scales != 1, calibrated if BatchTopK."""
    torch.manual_seed(seed)
    cfg = DictionaryConfig(d_in=12, width=40, k=3.0, arch=arch,  # type: ignore[arg-type]
                           levels=[8, 24, 40] if arch == "matryoshka-batchtopk" else None,
                           transcoder=transcoder, d_out=7 if transcoder else None)
    d = Dictionary(cfg)
    x = torch.randn(400, 12) * 4 + 1
    y = torch.randn(400, 7) * 0.3 if transcoder else None
    d.set_scales(float(x.norm(dim=1).mean()), float(y.norm(dim=1).mean()) if transcoder else None)
    d.initialize(x, y)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.2 * torch.randn_like(p))
    d.normalize_decoder()
    if cfg.activation == "batchtopk":
        calibrate_threshold(d, [x[:200], x[200:]])
    if cfg.activation == "jumprelu":  # learned thresholds that silence some positive pre-activations
        with torch.no_grad():
            d.log_threshold.copy_(torch.empty(40).uniform_(-1.5, 1.0))
    return d, torch.randn(64, 12) * 4 + 1


def _metadata(transcoder: bool) -> dict:
    return {"hooks": HOOKS_TC if transcoder else HOOKS_SAE, "model_name": "tiny-test", "context_size": 32,
            "dataset_path": "/data/text.jsonl", "store_fingerprint": "abc123", "summary": {"fvu": 0.1}}


@pytest.mark.parametrize("arch,transcoder,saelens_class", [
    ("matryoshka-batchtopk", False, "JumpReLUSAE"),
    ("batchtopk", False, "JumpReLUSAE"),
    ("topk", False, "TopKSAE"),
    ("relu", False, "StandardSAE"),
    ("matryoshka-prefix", True, "JumpReLUTranscoder"),
    ("relu", True, "Transcoder"),
    ("jumprelu", False, "JumpReLUSAE"),
    ("jumprelu", True, "JumpReLUTranscoder"),
])
def test_saelens_loads_our_directory_and_reproduces_encode_and_decode(tmp_path, arch, transcoder, saelens_class):
    d, x = _trained_like(arch, transcoder)
    save_dictionary(d, tmp_path / "dict", _metadata(transcoder))
    sae = SAE.load_from_disk(tmp_path / "dict")
    assert type(sae).__name__ == saelens_class
    with torch.no_grad():
        ours, theirs = d.encode(x), sae.encode(x)
        assert (ours > 0).any()
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(ours), d.decode(ours), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), d(x), rtol=1e-5, atol=1e-5)
    meta = sae.cfg.metadata
    assert meta.hook_name == HOOKS_TC["input"] if transcoder else HOOKS_SAE["input"]
    assert meta.model_name == "tiny-test" and meta.context_size == 32
    assert sae.cfg.normalize_activations == "none"
    if transcoder:
        assert meta.hook_name_out == HOOKS_TC["target"]


@pytest.mark.parametrize("arch,transcoder", [("matryoshka-batchtopk", False), ("topk", True), ("relu", False),
                                             ("jumprelu", False)])
def test_saved_dictionary_loads_back_with_the_same_outputs_and_metadata(tmp_path, arch, transcoder):
    d, x = _trained_like(arch, transcoder)
    path = save_dictionary(d, tmp_path / "dict", _metadata(transcoder))
    loaded = load_dictionary(path)
    assert loaded.cfg == d.cfg and loaded.levels == d.levels
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), d.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), d(x), rtol=1e-5, atol=1e-5)
    info = json.loads((path / "kukla.json").read_text())
    expected_hooks = HOOKS_TC if transcoder else {"input": HOOKS_SAE["input"], "target": HOOKS_SAE["input"]}
    assert info["hooks"] == expected_hooks  # an SAE's target is its input hook
    assert info["levels"] == d.levels and info["arch"] == arch
    assert info["metadata"]["store_fingerprint"] == "abc123"
    assert loaded.metadata["hooks"] == info["hooks"]
    if d.cfg.activation == "batchtopk":
        assert info["inference_l0"] == pytest.approx(float(d.inference_l0))
        assert torch.equal(loaded.threshold, d.threshold)
    if d.cfg.activation == "jumprelu":
        torch.testing.assert_close(loaded.log_threshold, d.log_threshold)


def test_topk_transcoder_is_marked_as_having_no_saelens_class(tmp_path):
    d, _ = _trained_like("topk", True)
    save_dictionary(d, tmp_path / "tc", _metadata(True))
    assert json.loads((tmp_path / "tc" / "kukla.json").read_text())["saelens_architecture"] is None
    with pytest.raises(KeyError):  # SAELens has no TopK transcoder: it refuses instead of misreading it
        SAE.load_from_disk(tmp_path / "tc")


def test_saving_again_overwrites_a_checkpoint_in_place(tmp_path):
    d, x = _trained_like("topk", False)
    save_dictionary(d, tmp_path / "dict", _metadata(False))
    with torch.no_grad():
        d.b_enc.add_(1.0)
    save_dictionary(d, tmp_path / "dict", _metadata(False))
    torch.testing.assert_close(load_dictionary(tmp_path / "dict").encode(x), d.encode(x), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "dict").iterdir()) == ["cfg.json", "kukla.json",
                                                                     "sae_weights.safetensors"]


def test_uncalibrated_batchtopk_is_not_saved(tmp_path):
    d = Dictionary(DictionaryConfig(d_in=8, width=16, k=2, arch="batchtopk"))
    with pytest.raises(KuklaError, match="calibrate_threshold"):
        save_dictionary(d, tmp_path / "dict", {"hooks": HOOKS_SAE})


def _saelens_sae(kind: str):
    torch.manual_seed(3)
    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=10, d_sae=30, apply_b_dec_to_input=False))
    elif kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=10, d_sae=30, k=4))
    elif kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=10, d_sae=30))
    else:
        sae = Transcoder(TranscoderConfig(d_in=10, d_sae=30, d_out=6, apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        if kind == "jumprelu":
            sae.threshold.copy_(torch.rand(30) * 0.5)  # per-latent thresholds, as in Gemma Scope
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    return sae


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu", "transcoder"])
def test_plain_saelens_directories_load_with_the_same_outputs(tmp_path, kind):
    sae = _saelens_sae(kind)
    sae.save_model(tmp_path / kind)
    ours = load_dictionary(tmp_path / kind)
    x = torch.randn(50, 10) * 2
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), sae(x), rtol=1e-5, atol=1e-5)
    assert ours.metadata["hooks"]["input"] == "blocks.0.hook_resid_post"


def test_a_directory_that_is_no_dictionary_is_refused_with_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(KuklaError, match="cfg.json and sae_weights.safetensors"):
        load_dictionary(tmp_path)
    with pytest.raises(KuklaError, match="not a dictionary directory"):
        load_dictionary(tmp_path / "missing")


@pytest.mark.parametrize("arch,activation,prefixes", [("matryoshka-batchtopk", "batchtopk", "levels"),
                                                      ("batchtopk", "batchtopk", "none"),
                                                      ("relu", "relu", "none")])
def test_kukla_json_of_earlier_versions_loads_as_the_same_dictionary(tmp_path, arch, activation, prefixes):
    d, x = _trained_like(arch, False)
    path = save_dictionary(d, tmp_path / "dict", _metadata(False))
    info = json.loads((path / "kukla.json").read_text())
    old = {k: v for k, v in info["config"].items() if k not in ("l0_coefficient", "bandwidth", "threshold_init")}
    old.update(arch=arch, activation="batchtopk", prefixes="sampled")  # how versions before `prefixes` wrote it
    (path / "kukla.json").write_text(json.dumps({**info, "config": old}))
    loaded = load_dictionary(path)
    assert (loaded.cfg.activation, loaded.cfg.prefixes, loaded.levels) == (activation, prefixes, d.levels)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), d.encode(x), rtol=1e-5, atol=1e-5)
