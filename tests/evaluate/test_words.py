"""Word activations for the absorption probes: the cached prefix changes nothing."""

from __future__ import annotations

from pathlib import Path

import torch

from kukla.pipeline.evaluate.absorption import prompt_activations, word_activations
from kukla.pipeline.models import load_model
from tests.harvest.conftest import build_tiny_model_dir


def test_cached_prefix_gives_the_activations_of_the_full_prompt(tmp_path: Path) -> None:
    model = load_model(str(build_tiny_model_dir(tmp_path / "model")))
    prefix, words = [1, 7, 9, 3, 22, 5, 30, 31], [11, 12, 13, 40, 41]
    hook = "blocks.1.hook_resid_post"
    got = prompt_activations(model, hook, prefix, words, batch_size=2)
    _, cache = model.run_with_cache(torch.tensor([prefix + [w] for w in words]), names_filter=[hook])
    assert torch.allclose(got, cache[hook][:, -1], atol=1e-5)


def test_absorption_is_skipped_with_a_reason_when_its_prompt_outgrows_the_models_context(tmp_path: Path) -> None:
    """A char-level tokenizer spells the in-context examples out: hundreds of tokens, past n_ctx 64."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = [a + b for a in letters for b in letters]
    model = load_model(str(build_tiny_model_dir(tmp_path / "model", n_ctx=64, words=words)))
    why = word_activations(model, "blocks.1.hook_resid_post", n_words=300)
    assert isinstance(why, str) and "longer than the model's context (64)" in why
    acts, first = word_activations(load_model(str(build_tiny_model_dir(tmp_path / "long", n_ctx=1024, words=words))),
                                   "blocks.1.hook_resid_post", n_words=300)
    assert acts.shape == (300, 32) and len(first) == 300
