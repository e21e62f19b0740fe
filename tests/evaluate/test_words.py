"""Word activations for the absorption probes: the cached prefix changes nothing."""

from __future__ import annotations

from pathlib import Path

import torch

from kukla.pipeline.evaluate.absorption import prompt_activations
from kukla.pipeline.models import load_model
from tests.harvest.conftest import build_tiny_model_dir


def test_cached_prefix_gives_the_activations_of_the_full_prompt(tmp_path: Path) -> None:
    model = load_model(str(build_tiny_model_dir(tmp_path / "model")))
    prefix, words = [1, 7, 9, 3, 22, 5, 30, 31], [11, 12, 13, 40, 41]
    hook = "blocks.1.hook_resid_post"
    got = prompt_activations(model, hook, prefix, words, batch_size=2)
    _, cache = model.run_with_cache(torch.tensor([prefix + [w] for w in words]), names_filter=[hook])
    assert torch.allclose(got, cache[hook][:, -1], atol=1e-5)
