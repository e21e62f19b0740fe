"""The training objective against naive, independently written computations."""

from __future__ import annotations

import pytest
import torch

from kukla.pipeline.dictionary import Dictionary, DictionaryConfig, training_loss
from kukla.pipeline.dictionary.prefixes import sample_prefix_lengths


def _dictionary(seed: int = 0, **overrides) -> tuple[Dictionary, torch.Tensor]:
    torch.manual_seed(seed)
    settings = dict(d_in=12, width=48, k=3.0, arch="matryoshka-batchtopk", levels=[4, 12, 28, 48])
    settings.update(overrides)
    dictionary = Dictionary(DictionaryConfig(**settings))
    x = torch.randn(40, 12) * 2 + 0.5
    dictionary.set_scales(float(x.norm(dim=1).mean()))
    dictionary.initialize(x)
    with torch.no_grad():  # break the W_enc = W_decᵀ symmetry so gradient checks see every term
        dictionary.W_enc.add_(0.1 * torch.randn_like(dictionary.W_enc))
        dictionary.b_enc.add_(0.1 * torch.randn_like(dictionary.b_enc))
    return dictionary, x


def _naive_batch_topk_codes(pre: torch.Tensor, k: float) -> torch.Tensor:
    """relu(pre) where pre is among the round(k·B) largest entries of the batch, by a full sort."""
    acts = pre.relu()
    n = round(k * pre.shape[0])
    cutoff = acts.flatten().sort(descending=True).values[n - 1]
    return acts * (acts >= cutoff)


def _naive_prefix_loss(d: Dictionary, x: torch.Tensor, prefixes: list[int], weights: list[float],
                       y: torch.Tensor | None = None) -> torch.Tensor:
    """Σ w · FVU with one full decode per prefix (what the cumulative sum must equal)."""
    x_s = x * d.input_scale
    if y is None:  # SAE: reconstruct the input
        z, target = _naive_batch_topk_codes((x_s - d.b_dec) @ d.W_enc + d.b_enc, float(d.cfg.k)), x_s
    else:  # transcoder: predict the target hook
        z, target = _naive_batch_topk_codes(x_s @ d.W_enc + d.b_enc, float(d.cfg.k)), y * d.target_scale
    total_var = ((target - target.mean(0)) ** 2).sum()
    loss = torch.zeros(())
    for p, w in zip(prefixes, weights):
        recon = z[:, :p] @ d.W_dec[:p] + d.b_dec
        loss = loss + w * ((target - recon) ** 2).sum() / total_var
    return loss


def _grads(d: Dictionary, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [d.W_enc, d.b_enc, d.W_dec, d.b_dec]))


@pytest.mark.parametrize("sparse_path", [False, True])
def test_cumulative_matryoshka_loss_and_gradients_equal_per_prefix_computation(sparse_path):
    d, x = _dictionary(sparse_path=sparse_path, level_weights=[0.5, 1.0, 2.0, 0.25])
    out = training_loss(d, x)
    naive = _naive_prefix_loss(d, x, [4, 12, 28, 48], [0.5, 1.0, 2.0, 0.25])
    torch.testing.assert_close(out.loss, naive, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(_grads(d, out.loss), _grads(d, naive)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sparse_path", [False, True])
def test_matryoshka_transcoder_loss_and_gradients_equal_per_prefix_computation(sparse_path):
    torch.manual_seed(4)
    d = Dictionary(DictionaryConfig(d_in=12, d_out=7, width=48, k=3.0, arch="matryoshka-batchtopk",
                                    levels=[4, 12, 28, 48], transcoder=True, sparse_path=sparse_path))
    x, y = torch.randn(40, 12) * 2 + 0.5, torch.randn(40, 7) * 0.2 - 1
    d.set_scales(float(x.norm(dim=1).mean()), float(y.norm(dim=1).mean()))
    d.initialize(x, y)
    with torch.no_grad():
        d.W_dec.copy_(0.3 * torch.randn_like(d.W_dec))  # trained-like: a transcoder's decoder starts at zero
    out = training_loss(d, x, y)
    naive = _naive_prefix_loss(d, x, [4, 12, 28, 48], [0.25] * 4, y)
    torch.testing.assert_close(out.loss, naive, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(_grads(d, out.loss), _grads(d, naive)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_default_level_weights_are_the_mean_over_levels():
    d, x = _dictionary()
    naive = _naive_prefix_loss(d, x, [4, 12, 28, 48], [0.25] * 4)
    torch.testing.assert_close(training_loss(d, x).loss, naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparse_path", [False, True])
def test_sampled_prefix_loss_averages_every_draw_including_full_width(sparse_path):
    d, x = _dictionary(arch="matryoshka-prefix", levels=None, n_prefixes=6, sparse_path=sparse_path)
    out = training_loss(d, x, generator=torch.Generator().manual_seed(5))
    draws = sample_prefix_lengths(48, 6, torch.Generator().manual_seed(5))
    assert draws[-1] == 48 and len(draws) == 7
    naive = _naive_prefix_loss(d, x, draws, [1 / 7] * 7)
    torch.testing.assert_close(out.loss, naive, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(_grads(d, out.loss), _grads(d, naive)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def _with_dead_latents(d: Dictionary, dead: slice) -> None:
    d.tokens_since_fired[dead] = d.cfg.dead_tokens
    d.count_dead()


@pytest.mark.parametrize("arch,transcoder", [("matryoshka-batchtopk", False), ("topk", False),
                                             ("matryoshka-batchtopk", True), ("matryoshka-prefix", False)])
def test_sparse_path_matches_dense_reference_in_values_and_gradients(arch, transcoder):
    results = []
    for sparse_path in (False, True):
        torch.manual_seed(1)
        settings = dict(d_in=12, width=48, k=3.0, arch=arch, sparse_path=sparse_path, aux_k=5,
                        levels=[4, 12, 28, 48] if arch == "matryoshka-batchtopk" else None,
                        transcoder=transcoder, d_out=9 if transcoder else None)
        d = Dictionary(DictionaryConfig(**settings))
        x, y = torch.randn(40, 12) * 2 + 0.5, torch.randn(40, 9) if transcoder else None
        d.set_scales(float(x.norm(dim=1).mean()), float(y.norm(dim=1).mean()) if transcoder else None)
        d.initialize(x, y)
        with torch.no_grad():
            d.W_dec.add_(0.1 * torch.randn_like(d.W_dec))  # a transcoder's decoder starts at zero
            d.W_enc.add_(0.1 * torch.randn_like(d.W_enc))
        _with_dead_latents(d, slice(20, 40))
        out = training_loss(d, x, y, generator=torch.Generator().manual_seed(3))
        assert float(out.metrics["aux"]) > 0
        results.append((out.loss.detach(), out.metrics, out.fired, _grads(d, out.loss)))
    (loss_r, metrics_r, fired_r, grads_r), (loss_s, metrics_s, fired_s, grads_s) = results
    torch.testing.assert_close(loss_s, loss_r, rtol=1e-5, atol=1e-6)
    assert torch.equal(fired_s, fired_r)
    for key in metrics_r:
        assert float(metrics_s[key]) == pytest.approx(float(metrics_r[key]), rel=1e-5, abs=1e-7)
    for name, ours, ref in zip(["W_enc", "b_enc", "W_dec", "b_dec"], grads_s, grads_r):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6, msg=name)


def test_batch_topk_keeps_k_times_batch_entries_once_for_all_prefixes():
    d, x = _dictionary(k=2.5)  # fractional: 2.5 · 40 = 100 entries over the batch
    out = training_loss(d, x)
    assert float(out.metrics["l0"]) * x.shape[0] == pytest.approx(100)
    # every level's FVU is that of the full-dictionary codes cut to the level, not a per-level selection
    with torch.no_grad():
        x_s = x * d.input_scale
        z = _naive_batch_topk_codes(d.pre_activations(x), 2.5)
        assert int((z > 0).sum()) == 100
        per_row = (z > 0).sum(1)
        assert per_row.min() != per_row.max()  # BatchTopK: rows differ, only the average is k
        for width in (4, 12, 28, 48):
            recon = z[:, :width] @ d.W_dec[:width] + d.b_dec
            fvu = float(((x_s - recon) ** 2).sum() / ((x_s - x_s.mean(0)) ** 2).sum())
            assert float(out.metrics[f"fvu/level_{width}"]) == pytest.approx(fvu, rel=1e-5)


def _naive_aux(d: Dictionary, x: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """Top k_aux dead pre-activations per token reconstruct the detached residual; FVU of that."""
    x_s = x * d.input_scale
    pre = (x_s - d.b_dec) @ d.W_enc + d.b_enc
    z = _naive_batch_topk_codes(pre, float(d.cfg.k))
    residual = (x_s - (z @ d.W_dec + d.b_dec)).detach()
    masked = pre.masked_fill(~dead, float("-inf"))
    top = masked.topk(k_aux, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    return ((residual - z_aux @ d.W_dec) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()


@pytest.mark.parametrize("sparse_path", [False, True])
def test_aux_k_reconstructs_the_residual_with_dead_latents_and_trains_their_encoder(sparse_path):
    d, x = _dictionary(arch="batchtopk", levels=None, aux_k=4, sparse_path=sparse_path, aux_coefficient=0.5)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True  # 16 dead latents, 4 of them per token

    d.tokens_since_fired[dead] = d.cfg.dead_tokens
    assert d.count_dead() == 16
    out = training_loss(d, x)
    naive_aux = _naive_aux(d, x, dead, 4)
    assert float(out.metrics["aux"]) == pytest.approx(float(naive_aux.detach()), rel=1e-5)
    d.cfg.aux_coefficient = 0.0
    without_aux = training_loss(d, x).loss
    torch.testing.assert_close(out.loss, without_aux + 0.5 * naive_aux, rtol=1e-5, atol=1e-6)
    # the aux term's gradient reaches the encoder columns of dead latents (sparsify's fused kernel drops it)
    aux_grad_enc, aux_grad_dec = torch.autograd.grad(out.loss - without_aux, [d.W_enc, d.W_dec])
    assert aux_grad_enc[:, dead].abs().sum() > 0 and aux_grad_dec[dead].abs().sum() > 0
    assert aux_grad_enc[:, ~dead].abs().max() < 1e-6  # only dead latents take part in aux-k
    naive_enc, = torch.autograd.grad(0.5 * _naive_aux(d, x, dead, 4), [d.W_enc])
    torch.testing.assert_close(aux_grad_enc, naive_enc, rtol=1e-4, atol=1e-6)
    # fewer dead latents than aux_k: every dead latent takes part
    d.cfg.aux_coefficient = 0.5
    d.tokens_since_fired.zero_()
    d.tokens_since_fired[[5, 30]] = d.cfg.dead_tokens
    d.count_dead()
    few = torch.zeros(48, dtype=torch.bool)
    few[[5, 30]] = True
    assert float(training_loss(d, x).metrics["aux"]) == pytest.approx(float(_naive_aux(d, x, few, 2).detach()), rel=1e-5)


def test_no_aux_loss_while_no_latent_is_dead():
    d, x = _dictionary()
    assert float(training_loss(d, x).metrics["aux"]) == 0.0


def test_relu_loss_is_fvu_plus_scale_free_l1():
    d, x = _dictionary(arch="relu", levels=None, k=None, l1_coefficient=0.3)
    out = training_loss(d, x)
    x_s = x * d.input_scale
    z = ((x_s - d.b_dec) @ d.W_enc + d.b_enc).relu()
    var = ((x_s - x_s.mean(0)) ** 2).sum()
    fvu = ((x_s - z @ d.W_dec - d.b_dec) ** 2).sum() / var
    l1 = (z * d.W_dec.norm(dim=1)).sum(1).mean() / (var / x.shape[0]).sqrt()
    torch.testing.assert_close(out.loss, fvu + 0.3 * l1, rtol=1e-5, atol=1e-6)
    assert float(out.metrics["l0"]) == pytest.approx(float((z > 0).sum(1).float().mean()))
    assert torch.equal(out.fired, (z > 0).any(0))


def test_mse_metric_is_in_raw_units():
    d, x = _dictionary(arch="batchtopk", levels=None)
    out = training_loss(d, x)
    with torch.no_grad():
        z = _naive_batch_topk_codes(d.pre_activations(x), 3.0)
        recon = d.decode(z)
    assert float(out.metrics["mse"]) == pytest.approx(float(((x - recon) ** 2).mean()), rel=1e-5)


def test_sparse_path_runs_under_bf16_autocast_with_fp32_gradients():
    d, x = _dictionary(arch="batchtopk", levels=None, aux_k=4)
    d.tokens_since_fired[::4] = d.cfg.dead_tokens
    d.count_dead()
    exact = training_loss(d, x).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = training_loss(d, x)
    grads = _grads(d, out.loss)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert float(out.loss.detach()) == pytest.approx(float(exact.detach()), rel=0.05)


@pytest.mark.parametrize("arch,sparse_path,scheme", [
    ("matryoshka-batchtopk", True, {}), ("matryoshka-batchtopk", False, {}), ("topk", True, {}), ("relu", False, {}),
    ("matryoshka-prefix", True, dict(prefixes="sampled")), ("matryoshka-prefix", True, dict(prefixes="all", activation="topk"))])
def test_training_pass_and_dead_update_never_read_the_device(arch, sparse_path, scheme, monkeypatch):
    """On a GPU a read (item, tolist, bool, float, int, index) makes the host wait for the device: a step
    must not do one, nor may drawn prefixes. CPU tensors can't show the wait, so count the reads themselves."""
    d, x = _dictionary(arch=arch, sparse_path=sparse_path, aux_k=4, k=None if arch == "relu" else 3.0,
                       levels=[4, 12, 28, 48] if arch == "matryoshka-batchtopk" else None, **scheme)
    generator = torch.Generator().manual_seed(0)
    _with_dead_latents(d, slice(0, 48, 3))  # aux-k runs: its decision must not read the dead count either
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
    out = training_loss(d, x, generator=generator)
    out.loss.backward()
    d.update_dead(out.fired, x.shape[0])
    monkeypatch.undo()
    assert reads == []
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.metrics.values())
    assert float(out.metrics["aux"]) > 0 or arch == "relu"
