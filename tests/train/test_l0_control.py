"""The target-L0 controller moves the penalty weight until a ReLU dictionary fires the L0 asked for."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import HOOK
from stores import sparse_rows

from kukla.errors import ConfigError
from kukla.pipeline.dictionary import DictionaryConfig
from kukla.pipeline.train import train
from kukla.pipeline.train.config import TrainConfig
from kukla.pipeline.train.distributed import Ranks
from kukla.pipeline.train.sweep import build_trainees, train_step


def _train(arch_settings: dict, steps: int) -> tuple[list[float], list[float]]:
    rows, _ = sparse_rows(8192, 16, 48, seed=0)
    pool = torch.from_numpy(rows)
    config = TrainConfig(store=Path("unused"), out=Path("unused"), hook="h", width=[48], batch_size=256,
                         tokens=256 * steps, lr=1e-2, warmup=0.0, decay_start=1.0, **arch_settings)
    ranks = Ranks(rank=0, world=1, device=torch.device("cpu"))
    [trainee] = build_trainees(config, config.members(16, 16), ranks, (float(pool.norm(dim=1).mean()), None),
                               (pool[:2048],))
    l0s, coefficients = [], []
    for step in range(steps):
        before = float(trainee.dictionary.penalty_coefficient)
        train_step([trainee], (pool[(step * 256) % 8192:][:256],), step, steps, config, ranks)
        l0 = float(trainee.last["l0"])
        assert float(trainee.dictionary.penalty_coefficient) == pytest.approx(
            before * math.exp(config.l0_control_rate * (l0 - config.target_l0) / max(l0, config.target_l0)), rel=1e-5)
        l0s.append(l0)
        coefficients.append(before)
    return l0s, coefficients


@pytest.mark.parametrize("target", [6.0, 12.0])
def test_relu_training_l0_settles_at_the_target(target):
    l0s, coefficients = _train(dict(arch="relu", target_l0=target, l0_control_rate=0.05), 300)
    late = sum(l0s[-50:]) / 50
    assert late == pytest.approx(target, rel=0.1), (l0s[:5], l0s[-5:])
    assert len(set(coefficients)) > 1  # λ moved (it is a buffer: checkpoints carry it)


def test_target_l0_is_for_penalised_dictionaries_only():
    with pytest.raises(ConfigError, match="target_l0"):
        DictionaryConfig(d_in=8, width=32, k=2, arch="batchtopk", target_l0=4)


def test_a_run_that_ends_far_from_its_target_l0_says_so(store: Path, tmp_path: Path, kukla_log) -> None:
    """A penalty too slow for the run leaves L0 far from the target; the run must not end as if it got there."""
    import json

    train(TrainConfig(store=store, out=tmp_path, hook=HOOK, arch="relu", width=[64], target_l0=0.5,
                      l0_control_rate=0.001, batch_size=256, tokens=256 * 10, log_every=5, checkpoint_every=0,
                      threads=1))
    final = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] and final["l0"] > 0.75
    assert any(f"L0 ended at {final['l0']:.3g}, not near target_l0 0.5" in r.getMessage() for r in kukla_log.records)
