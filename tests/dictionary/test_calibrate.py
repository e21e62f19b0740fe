"""BatchTopK's inference threshold: calibrated on held-out rows so inference L0 ≈ k."""

from __future__ import annotations

import pytest
import torch

from kukla.errors import KuklaError
from kukla.pipeline.dictionary import Dictionary, DictionaryConfig, calibrate_threshold, calibration_rows, evaluation_rows
from kukla.pipeline.dictionary.rules.batchtopk import CALIBRATION_ROWS_MAX


def _rows(n: int, gen: torch.Generator) -> torch.Tensor:
    scale = torch.linspace(0.5, 2.0, 24)
    return torch.randn(n, 24, generator=gen) * scale + 0.3


def test_calibrated_threshold_gives_inference_l0_close_to_k_on_unseen_rows():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    d = Dictionary(DictionaryConfig(d_in=24, width=256, k=6.5, arch="matryoshka-batchtopk", levels=[64, 256]))
    d.set_scales(float(_rows(2000, gen).norm(dim=1).mean()))
    d.initialize(_rows(2000, gen))
    held_out = [_rows(500, gen) for _ in range(8)]
    l0 = calibrate_threshold(d, held_out)
    assert l0 == pytest.approx(6.5, rel=1e-3)  # on the calibration rows, by construction
    assert float(d.inference_l0) == l0
    seen = torch.cat([(d.encode(b) > 0).sum(1) for b in held_out]).float().mean()
    assert float(seen) == pytest.approx(l0, rel=1e-6)
    unseen = (d.encode(_rows(4000, gen)) > 0).sum(1).float().mean()
    assert float(unseen) == pytest.approx(6.5, rel=0.04)


def test_calibration_accepts_input_target_tuples_and_refuses_other_rules():
    gen = torch.Generator().manual_seed(1)
    d = Dictionary(DictionaryConfig(d_in=24, d_out=5, width=64, k=2, arch="batchtopk", transcoder=True))
    l0 = calibrate_threshold(d, [(_rows(300, gen), torch.randn(300, 5)) for _ in range(2)])
    assert l0 == pytest.approx(2, rel=1e-2)
    topk = Dictionary(DictionaryConfig(d_in=24, width=64, k=2, arch="topk"))
    with pytest.raises(KuklaError, match="BatchTopK"):
        calibrate_threshold(topk, [_rows(10, gen)])
    with pytest.raises(KuklaError, match="no rows"):
        calibrate_threshold(d, [])


def _trained_like(gen: torch.Generator) -> Dictionary:
    d = Dictionary(DictionaryConfig(d_in=24, width=128, k=4, arch="batchtopk"))
    d.set_scales(float(_rows(2000, gen).norm(dim=1).mean()))
    d.initialize(_rows(2000, gen))
    return d


def test_per_latent_thresholds_fire_each_latent_as_often_as_batchtopk_chose_it():
    gen = torch.Generator().manual_seed(2)
    d = _trained_like(gen)
    batches = [_rows(256, gen) for _ in range(6)]
    l0 = calibrate_threshold(d, batches, per_latent=True)
    chosen = torch.zeros(128, dtype=torch.long)  # BatchTopK by hand: the 4·256 largest positive entries
    for x in batches:
        pre = d.pre_activations(x).detach().reshape(-1)
        top = pre.topk(4 * 256).indices
        chosen += torch.bincount(top[pre[top] > 0] % 128, minlength=128)
    with torch.no_grad():
        fired = torch.cat([(d.encode(x) > 0) for x in batches]).sum(0)
    assert torch.equal(fired, chosen)
    assert d.threshold.unique().numel() > 1
    assert l0 == pytest.approx(float(chosen.sum()) / (6 * 256), abs=1e-9) == pytest.approx(4, rel=1e-3)


def test_l0_cap_keeps_each_tokens_largest_codes_and_lowers_only_the_tail():
    gen = torch.Generator().manual_seed(3)
    d = _trained_like(gen)
    batches = [_rows(256, gen) for _ in range(4)]
    batches[0][:3] *= 12  # three massive-activation rows
    calibrate_threshold(d, batches)
    with torch.no_grad():
        uncapped = d.encode(batches[0])
    assert int((uncapped > 0).sum(1).max()) > 8
    l0 = calibrate_threshold(d, batches, l0_cap=8)
    with torch.no_grad():
        capped = d.encode(batches[0])
    for row_capped, row in zip(capped, uncapped):  # naive: the row's 8 largest uncapped codes, or all of them
        keep = row.topk(8).indices if int((row > 0).sum()) > 8 else (row > 0).nonzero().squeeze(1)
        expected = torch.zeros_like(row)
        expected[keep] = row[keep]
        assert torch.equal(row_capped, expected)
    with torch.no_grad():
        measured = torch.cat([(d.encode(x) > 0).sum(1) for x in batches]).float().mean()
    assert l0 == pytest.approx(float(measured), abs=1e-9) and int(d.l0_cap) == 8


def test_l0_cap_counts_per_token_on_batches_of_contexts():
    """Downstream splices [batch, pos, d]: the cap must count each token's codes, not a column's."""
    gen = torch.Generator().manual_seed(4)
    d = _trained_like(gen)
    contexts = _rows(4 * 64, gen)
    contexts[::7] *= 12  # massive rows, so some tokens exceed the cap
    calibrate_threshold(d, [_rows(256, gen)], l0_cap=8)
    with torch.no_grad():
        rows = d.encode(contexts)
        batched = d.encode(contexts.reshape(4, 64, 24))
    assert int((rows > 0).sum(1).max()) == 8
    assert torch.equal(batched.reshape(-1, 128), rows)


def test_calibration_and_evaluation_splits_part_the_holdout():
    class Rows:
        def __init__(self, n_rows: int, holdout_rows: int) -> None:
            self.n_rows, self.holdout_rows = n_rows, holdout_rows

    assert (calibration_rows(Rows(1000, 100)), evaluation_rows(Rows(1000, 100))) == (range(900, 950), range(950, 1000))
    big = Rows(10**8, 1 << 20)  # at 10⁸ tokens: 2¹⁸ calibrate, the other 786,432 are scored
    assert len(calibration_rows(big)) == CALIBRATION_ROWS_MAX and len(evaluation_rows(big)) == 3 << 18
    assert calibration_rows(big).stop == evaluation_rows(big).start and evaluation_rows(big).stop == 10**8
    assert not calibration_rows(Rows(10, 1)) and evaluation_rows(Rows(10, 1)) == range(9, 10)
