"""CE recovered / KL on a tiny random TransformerLens model (real forward passes)."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from kukla.pipeline.evaluate.reconstruction import Splice, evaluate_downstream

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def tiny_model() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=12, d_head=4, n_heads=4, d_mlp=32,
                                  d_vocab=40, act_fn="gelu", normalization_type="LN")
    return HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def contexts() -> torch.Tensor:
    return torch.randint(0, 40, (10, 12), generator=torch.Generator().manual_seed(5))


def test_ce_recovered_is_one_for_a_perfect_reconstruction_and_zero_for_zero_ablation(
        tiny_model: HookedTransformer, contexts: torch.Tensor) -> None:
    block = tiny_model.blocks[0]
    splices = {
        "identity": Splice(HOOK, HOOK, lambda x: x.clone()),
        "zero": Splice(HOOK, HOOK, torch.zeros_like),
        "half": Splice(HOOK, HOOK, lambda x: 0.5 * x),
        # An exact transcoder: the block's own MLP, read at resid_mid, spliced at mlp_out.
        "exact_transcoder": Splice("blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out",
                                   lambda x: block.mlp(block.ln2(x))),
    }
    out = evaluate_downstream(tiny_model, contexts, splices, batch_size=3)
    clean_ce = tiny_model(contexts, return_type="loss").item()
    assert out["identity"]["ce_loss_clean"] == pytest.approx(clean_ce, rel=1e-5)
    assert out["identity"]["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert out["identity"]["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6)
    assert out["identity"]["kl_score"] == pytest.approx(1.0, abs=1e-6)
    assert out["zero"]["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert out["zero"]["kl_score"] == pytest.approx(0.0, abs=1e-9)
    assert out["exact_transcoder"]["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    # The ablated CE is an independent zero-ablation pass.
    zeroed = tiny_model.run_with_hooks(contexts, return_type="loss",
                                       fwd_hooks=[(HOOK, lambda act, hook: torch.zeros_like(act))]).item()
    assert out["half"]["ce_loss_zero_ablation"] == pytest.approx(zeroed, rel=1e-5)
    expected = (zeroed - out["half"]["ce_loss_spliced"]) / (zeroed - clean_ce)
    assert out["half"]["ce_loss_recovered"] == pytest.approx(expected, rel=1e-6)


def test_positions_of_tokens_the_harvest_leaves_out_keep_the_models_activation(
        tiny_model: HookedTransformer, contexts: torch.Tensor) -> None:
    """The dictionary never saw BOS or separator activations (the harvest stores no rows for them),
    so neither the splice nor the ablation replaces them: BOS (0) leads each window, separators (1) sit inside."""
    windows = contexts.clone() % 38 + 2
    windows[:, 0], windows[:, [4, 9]] = 0, 1

    def halved(act, hook):
        return torch.where(torch.isin(windows, torch.tensor([0, 1]))[..., None], act, 0.5 * act)

    out = evaluate_downstream(tiny_model, windows, {"half": Splice(HOOK, HOOK, lambda x: 0.5 * x)}, unspliced=[0, 1])
    spliced = tiny_model.run_with_hooks(windows, return_type="loss", fwd_hooks=[(HOOK, halved)]).item()
    zeroed = tiny_model.run_with_hooks(windows, return_type="loss", fwd_hooks=[(
        HOOK, lambda act, hook: torch.where(torch.isin(windows, torch.tensor([0, 1]))[..., None], act, 0 * act))]).item()
    assert out["half"]["ce_loss_spliced"] == pytest.approx(spliced, rel=1e-6)
    assert out["half"]["ce_loss_zero_ablation"] == pytest.approx(zeroed, rel=1e-6)
    everywhere = evaluate_downstream(tiny_model, windows, {"half": Splice(HOOK, HOOK, lambda x: 0.5 * x)})
    assert everywhere["half"]["ce_loss_spliced"] != pytest.approx(spliced, rel=1e-6)


def test_mean_ablation_uses_the_given_mean(tiny_model: HookedTransformer, contexts: torch.Tensor) -> None:
    mean = torch.randn(16, generator=torch.Generator().manual_seed(6))
    out = evaluate_downstream(tiny_model, contexts, {"mean": Splice(HOOK, HOOK, lambda x: mean.expand_as(x))},
                              mean_ablation={HOOK: mean})
    assert out["mean"]["ce_loss_recovered_mean_ablation"] == pytest.approx(0.0, abs=1e-9)
    assert out["mean"]["ce_loss_mean_ablation"] != out["mean"]["ce_loss_zero_ablation"]


def test_a_splice_at_a_gated_hook_replaces_it() -> None:
    """hook_mlp_in fires only once its model flag is set: the splice must set it, not be skipped."""
    torch.manual_seed(1)
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=12, d_head=4, n_heads=4, d_mlp=32,
                                  d_vocab=40, act_fn="gelu", normalization_type="LN")
    model = HookedTransformer(cfg).eval()
    contexts = torch.randint(0, 40, (6, 12), generator=torch.Generator().manual_seed(2))
    block = model.blocks[1]
    mlp_in, mlp_out = "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"
    splices = {"zero_sae": Splice(mlp_in, mlp_in, torch.zeros_like),
               "exact_transcoder": Splice(mlp_in, mlp_out, lambda x: block.mlp(block.ln2(x)))}
    out = evaluate_downstream(model, contexts, splices, batch_size=4)
    zeroed = model.run_with_hooks(contexts, return_type="loss",
                                  fwd_hooks=[(mlp_in, lambda act, hook: torch.zeros_like(act))]).item()
    assert out["zero_sae"]["ce_loss_spliced"] == pytest.approx(zeroed, rel=1e-5)
    assert out["zero_sae"]["ce_loss_spliced"] != pytest.approx(out["zero_sae"]["ce_loss_clean"], rel=1e-3)
    assert out["exact_transcoder"]["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
