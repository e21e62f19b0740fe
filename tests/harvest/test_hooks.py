"""Hook names: short forms, validation against a model, and the layer the forward stops at."""

from __future__ import annotations

import re

import pytest

from kukla.errors import KuklaError
from kukla.pipeline.hooks import SHORT_FORMS, expand_hook, resolve_hooks, short_form, stop_at_layer


def test_short_forms_round_trip_to_transformerlens_names() -> None:
    assert expand_hook("resid_post:6") == "blocks.6.hook_resid_post"
    assert expand_hook("mlp_in:2") == "blocks.2.hook_mlp_in"
    assert expand_hook("blocks.3.hook_attn_out") == "blocks.3.hook_attn_out"
    for kind in SHORT_FORMS:
        assert short_form(expand_hook(f"{kind}:11")) == f"{kind}:11"
    with pytest.raises(KuklaError, match="whole number"):
        expand_hook("resid_post:x")


def test_forward_stops_after_the_last_needed_block() -> None:
    assert stop_at_layer(["blocks.1.hook_resid_post", "blocks.4.hook_mlp_out"], 18) == 5
    assert stop_at_layer(["hook_embed"], 18) == 0
    assert stop_at_layer(["blocks.17.hook_resid_post"], 18) == 18
    assert stop_at_layer(["ln_final.hook_normalized"], 18) is None


@pytest.mark.parametrize("hooks, skipped", [(["ln_final.hook_normalized"], "unembed"),
                                            (["blocks.0.hook_resid_post", "blocks.2.hook_resid_mid"], "blocks.2.mlp")])
def test_the_forward_ends_where_the_last_hook_fires(config_model, hooks: list[str], skipped: str) -> None:
    """Nothing after the last hook is computed (the unembedding of an ln_final harvest, the MLP of a
    resid_mid one), and every hook holds what a full forward caches."""
    import torch

    from kukla.pipeline.harvest.forward import capture

    calls = []
    handle = config_model.get_submodule(skipped).register_forward_hook(lambda *_: calls.append(1))
    tokens = torch.randint(0, config_model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            got = capture(config_model, tokens, hooks, stop_at_layer(hooks, config_model.cfg.n_layers))
            assert calls == []
            _, full = config_model.run_with_cache(tokens, names_filter=hooks)
    finally:
        handle.remove()
    assert calls == [1]  # the same module runs in the full forward: the count can see it
    for hook in hooks:
        assert torch.equal(got[hook], full[hook]), hook


def test_hooks_are_checked_and_measured_against_the_model(config_model) -> None:
    widths = resolve_hooks(config_model, ["mlp_in:1", "mlp_post:0", "z:2", "blocks.0.hook_resid_mid"])
    assert widths == {"blocks.1.hook_mlp_in": 16, "blocks.0.mlp.hook_post": 32, "blocks.2.attn.hook_z": 16,
                      "blocks.0.hook_resid_mid": 16}
    assert config_model.cfg.use_hook_mlp_in  # the flag without which hook_mlp_in never fires
    with pytest.raises(KuklaError, match="not one vector per token"):
        resolve_hooks(config_model, ["blocks.0.attn.hook_pattern"])
    with pytest.raises(KuklaError, match="given twice"):
        resolve_hooks(config_model, ["resid_post:0", "blocks.0.hook_resid_post"])


def test_widths_measured_at_block_0_are_the_widths_every_block_produces() -> None:
    """The probe runs block 0 only; a full forward at every layer (grouped-query attention, whose
    k/v hooks are narrower than q) must give the widths it reports."""
    import math

    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=3, d_model=16, n_heads=4, d_head=4, n_key_value_heads=2, d_mlp=24,
                                  n_ctx=8, d_vocab=50, act_fn="gelu", normalization_type="RMS", gated_mlp=True,
                                  positional_embedding_type="rotary", seed=0)
    model = HookedTransformer(cfg).eval()
    suffixes = ["hook_resid_pre", "hook_resid_mid", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z",
                "hook_attn_out", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "ln1.hook_scale"]
    names = [f"blocks.{layer}.{suffix}" for layer in range(3) for suffix in suffixes] + ["ln_final.hook_normalized"]
    widths = resolve_hooks(model, names)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.zeros((1, 3), dtype=torch.long), names_filter=names)
    assert widths == {name: math.prod(cache[name].shape[2:]) for name in names}
    assert widths["blocks.2.attn.hook_k"] == 2 * 4 and widths["blocks.2.attn.hook_q"] == 4 * 4


def test_a_hook_the_architecture_cannot_fire_is_one_line_error() -> None:
    """TransformerLens asserts when a hook's flag does not fit the model (hook_mlp_in on an
    attention-only model, hook_attn_in on grouped-query attention); kukla names the hook."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    base = dict(n_layers=2, d_model=16, n_heads=4, d_head=4, n_ctx=8, d_vocab=50, act_fn="gelu", seed=0)
    attn_only = HookedTransformer(HookedTransformerConfig(**base, attn_only=True)).eval()
    with pytest.raises(KuklaError, match=r"hook 'blocks.1.hook_mlp_in' cannot fire in this model.*attn_only"):
        resolve_hooks(attn_only, ["mlp_in:1"])
    gqa = HookedTransformer(HookedTransformerConfig(**base, d_mlp=24, n_key_value_heads=2)).eval()
    with pytest.raises(KuklaError, match=r"hook 'blocks.0.hook_attn_in' cannot fire in this model.*hook_q_input"):
        resolve_hooks(gqa, ["attn_in:0"])
    assert resolve_hooks(gqa, ["blocks.0.hook_q_input"]) == {"blocks.0.hook_q_input": 4 * 16}


def test_an_unknown_hook_is_answered_with_full_names_kukla_accepts(config_model) -> None:
    """The example full names in the message are ones harvest takes (not attention scores or patterns)."""
    with pytest.raises(KuklaError, match="or a full name such as") as refused:
        resolve_hooks(config_model, ["blocks.0.hook_resid_pots"])
    examples = str(refused.value).split("such as ")[1].removesuffix(", …").split(", ")
    assert len(examples) == 4 and resolve_hooks(config_model, examples).keys() == set(examples)


def _listed_as_valid(model, spec: str) -> tuple[list[str], list[str]]:
    """The short-form kinds and the example full names the unknown-hook message offers."""
    with pytest.raises(KuklaError, match="unknown hook") as refused:
        resolve_hooks(model, [spec])
    kinds, examples = re.fullmatch(r"unknown hook .*; valid: (.*) with layers .*, or a full name such as (.*), …",
                                   str(refused.value)).groups()
    return kinds.split(", "), examples.split(", ")


@pytest.mark.parametrize("architecture, absent", [({"attn_only": True}, "mlp"),
                                                  ({"d_mlp": 24, "n_key_value_heads": 2}, "attn_in")])
def test_an_unknown_hook_is_answered_only_with_hooks_this_model_fires(architecture: dict, absent: str) -> None:
    """An attention-only model has no MLP hooks to offer (TransformerLens builds hook_mlp_in and
    hook_mlp_out but never calls them); grouped-query attention cannot fire hook_attn_in."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, n_heads=4, d_head=4, n_ctx=8,
                                                      d_vocab=50, act_fn="gelu", seed=0, **architecture)).eval()
    kinds, examples = _listed_as_valid(model, "blocks.0.hook_resid_pots")
    assert "resid_post" in kinds and not [name for name in kinds + examples if absent in name], (kinds, examples)
    for kind in kinds:
        assert resolve_hooks(model, [f"{kind}:1"]).keys() == {expand_hook(f"{kind}:1")}
    assert resolve_hooks(model, examples).keys() == set(examples)
