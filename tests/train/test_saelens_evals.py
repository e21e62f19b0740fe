"""A dictionary trained on a store harvested from text enters SAELens' own evaluation as-is."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kukla.pipeline.models import load_model
from kukla.pipeline.train import TrainConfig, train
from tests.harvest.conftest import harvest_tiny_text

HOOK = "blocks.0.hook_resid_post"


def test_saelens_activations_store_accepts_a_dictionary_trained_on_harvested_text(tmp_path: Path) -> None:
    from datasets import Dataset
    from sae_lens import SAE, ActivationsStore

    store, texts, model_dir = harvest_tiny_text(tmp_path, [HOOK], n_docs=200, context_size=16, tokens=2000,
                                                holdout_rows=400)
    [path] = train(TrainConfig(store=store, out=tmp_path / "out", hook=HOOK, arch="topk", width=[32], k=[4],
                               batch_size=128, tokens=128 * 10, checkpoint_every=0, threads=1))

    sae = SAE.load_from_disk(str(path))
    assert sae.cfg.metadata.prepend_bos is True and sae.cfg.metadata.exclude_special_tokens is True
    model = load_model(str(model_dir))
    text = Dataset.from_list([json.loads(line) for line in texts.read_text().splitlines()])
    activations = ActivationsStore.from_sae(model, sae, dataset=text, streaming=False, store_batch_size_prompts=4)
    tokens = activations.get_batch_tokens(4)
    assert tokens.shape == (4, 16) and bool((tokens[:, 0] == model.tokenizer.bos_token_id).all())
    with torch.no_grad():
        assert sae.encode(model.run_with_cache(tokens, names_filter=[HOOK])[1][HOOK]).shape == (4, 16, 32)
