"""BatchTopK's inference threshold: calibrated on held-out rows so inference L0 ≈ k."""

from __future__ import annotations

import pytest
import torch

from kukla.errors import KuklaError
from kukla.pipeline.dictionary import Dictionary, DictionaryConfig, calibrate_threshold


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
