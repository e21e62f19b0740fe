"""Models kukla loads compute exactly what TransformerLens computes, without its per-call weight copies."""

from __future__ import annotations

import copy

import einops
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from kukla.pipeline.models import skip_per_call_weight_copies

GEMMA_LIKE = dict(act_fn="silu", gated_mlp=True, normalization_type="RMS", n_key_value_heads=2,
                  positional_embedding_type="rotary")
GPT2_LIKE = dict(act_fn="gelu_new", normalization_type="LN")


@pytest.mark.parametrize("shape", [GEMMA_LIKE, GPT2_LIKE], ids=["gated-gqa", "plain"])
def test_relaid_weights_give_bit_identical_activations_and_are_not_copied_per_call(shape: dict) -> None:
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16, d_vocab=50,
                                  seed=0, **shape)
    model = HookedTransformer(cfg).eval()
    reference = copy.deepcopy(model)
    fast = skip_per_call_weight_copies(model)
    tokens = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, expected = reference.run_with_cache(tokens)
        _, got = fast.run_with_cache(tokens)
    assert expected.keys() == got.keys()
    for name in expected.keys():
        assert torch.equal(expected[name], got[name]), name

    attn, mlp = fast.blocks[0].attn, fast.blocks[0].mlp
    w_q = einops.rearrange(attn.W_Q, "h m d -> (h d) m")  # what TransformerLens does per call
    w_o = einops.rearrange(attn.W_O, "h d m -> m (h d)")
    assert w_q.is_contiguous() and w_q.data_ptr() == attn.W_Q.data_ptr()  # a view: nothing copied
    assert w_o.is_contiguous() and w_o.data_ptr() == attn.W_O.data_ptr()
    if cfg.gated_mlp:
        assert mlp.W_gate.T.is_contiguous() and not reference.blocks[0].mlp.W_gate.T.is_contiguous()
