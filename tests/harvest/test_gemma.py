"""The embedded default model, end to end: Gemma-3-270m from the package index, converted once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kukla.pipeline.harvest import HarvestConfig, harvest
from kukla.pipeline.models import EMBEDDED_MODEL, load_model
from kukla.storage import open_store

STORY = ("Once upon a time, a little fox found a shiny red ball in the garden. She rolled it to her friend "
         "the rabbit, and they played until the sun went down. ")


@pytest.mark.slow
def test_embedded_gemma_harvest_matches_its_forward_pass(tmp_path: Path) -> None:
    texts = tmp_path / "stories.jsonl"
    texts.write_text("".join(json.dumps({"text": STORY * (i % 3 + 1)}) + "\n" for i in range(8)))
    model = load_model(EMBEDDED_MODEL)  # first run converts into ~/.cache/kukla (about 100 s), then ~5 s
    assert (model.cfg.n_layers, model.cfg.d_model) == (18, 640)

    config = HarvestConfig(output=str(tmp_path / "gemma.zarr"), model=EMBEDDED_MODEL, dataset=str(texts),
                           hook=["resid_post:3", "mlp_out:3"], context_size=64, tokens=300, batch_size=4)
    harvest(config, model=model)
    store = open_store(config.output)
    assert store.n_rows == 300 and store.meta["model"]["name"] == EMBEDDED_MODEL
    assert store.meta["model"]["d_model"] == 640
    token_id = store.read("tokens/token_id").numpy()
    assert model.tokenizer.bos_token_id not in token_id  # BOS positions are left out

    # Window 0 starts with the first story: its positions 1..n up to the story's EOS are a prefix.
    sequence, position = store.read("tokens/sequence").numpy(), store.read("tokens/position").numpy()
    first = np.flatnonzero(sequence == 0)
    first = first[np.argsort(position[first])]
    first = first[position[first] == np.arange(1, len(first) + 1)]
    assert len(first) > 20
    tokens = torch.tensor([[model.tokenizer.bos_token_id, *token_id[first].tolist()]])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.3.hook_resid_post", "blocks.3.hook_mlp_out"])
    for hook in ("blocks.3.hook_resid_post", "blocks.3.hook_mlp_out"):
        stored = store.read(f"acts/{hook}").float().numpy()[first]
        expected = cache[hook][0, 1:].numpy()
        scale = np.abs(expected).max()
        np.testing.assert_allclose(stored, expected, atol=0.01 * scale, rtol=0.01)  # bf16 store


@pytest.mark.slow
def test_a_gemma_saved_as_a_local_folder_loads_as_the_model_it_is(tmp_path: Path) -> None:
    """TransformerLens knows Gemma's configs by name only, so a folder saved with save_pretrained
    (what kukla's offline advice says to pass) was refused: 'Gemma3ForCausalLM is not currently supported'."""
    from kukla.errors import KuklaError
    from kukla.pipeline.models import convert_embedded_gemma

    local = tmp_path / "finetune"
    local.mkdir()
    for file in convert_embedded_gemma().iterdir():
        (local / file.name).symlink_to(file)
    embedded, folder = load_model(EMBEDDED_MODEL), load_model(str(local))
    tokens = embedded.to_tokens(STORY)
    with torch.no_grad():
        assert torch.equal(folder(tokens), embedded(tokens))
    other = tmp_path / "other-shape"
    other.mkdir()
    config = json.loads((local / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(KuklaError, match="TransformerLens cannot load this architecture"):
        load_model(str(other))
