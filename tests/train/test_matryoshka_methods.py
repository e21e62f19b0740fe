"""Latent reordering, restarts and the snap loss in real training runs: resume stays exact, the
switch and the restart are recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from conftest import HOOK
from safetensors.torch import load_file

from kukla.config import from_dict
from kukla.pipeline.train import TrainConfig, checkpoint, train

NAME = "matryoshka-prefix-w512-k3-s0"


def _config(store: Path, out: Path, **changes: object) -> TrainConfig:
    settings = dict(store=store, out=out, hook=HOOK, arch="matryoshka-prefix", width=[512], k=[3.0], n_prefixes=4,
                    batch_size=128, tokens=128 * 60, checkpoint_every=20, keep_checkpoints=5, log_every=10,
                    dead_tokens=256, threads=1, reorder_latents=True, snap_fraction=0.5, resample_at=[0.6])
    return from_dict(TrainConfig, {**settings, **changes})


def test_reordered_snap_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(store: Path, tmp_path: Path,
                                                                                  kukla_log) -> None:
    """Resumed at step 20, the run passes the restart at step 36 again and ends where it would have."""
    resumed, whole = tmp_path / "run", tmp_path / "whole"
    train(_config(store, resumed))
    [restart] = {r.getMessage() for r in kukla_log.records if "latents restarted" in r.getMessage()}  # once or twice
    assert restart.startswith(f"{NAME}, step 36:") and not restart.endswith(" 0 latents restarted"), restart
    shutil.copytree(resumed, whole)
    # rewind to a run killed right after its step-20 checkpoint: nothing later survives
    early = checkpoint.checkpoints_dir(resumed) / "step-00000020"
    for later in [p for p in checkpoint.checkpoints_dir(resumed).glob("step-*") if p.name > early.name]:
        shutil.rmtree(later)
    shutil.rmtree(resumed / NAME)
    (checkpoint.checkpoints_dir(resumed) / "latest").write_text(early.name + "\n")
    saved = checkpoint.load_state(early)["members"][NAME]["dictionary"]
    assert saved["contribution"].diff().le(0).all() and saved["contribution"][0] > 0  # sorted by contribution
    train(_config(store, resumed, resume=True))
    a = load_file(str(whole / NAME / "sae_weights.safetensors"))
    b = load_file(str(resumed / NAME / "sae_weights.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    final_a = checkpoint.load_state(checkpoint.latest_checkpoint(whole))["members"][NAME]
    final_b = checkpoint.load_state(checkpoint.latest_checkpoint(resumed))["members"][NAME]
    for key, value in final_a["dictionary"].items():
        assert torch.equal(value, final_b["dictionary"][key]), key
    for param, state in final_a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], final_b["optimizer"]["state"][param]["exp_avg"])

    lines = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines() if "step" in line]
    assert [(line["step"], line["snap_l2"]) for line in lines] == [(s, float(s > 30)) for s in range(10, 61, 10)]
    meta = json.loads((whole / NAME / "kukla.json").read_text())
    assert meta["metadata"]["snap_step"] == 30 and meta["config"]["snap_fraction"] == 0.5
