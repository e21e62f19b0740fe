"""Two gloo ranks under torchrun train as one process does on the same global batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HOOK

from kukla.pipeline.train import TrainConfig, checkpoint
from kukla.pipeline.train.config import learning_rate
from kukla.pipeline.train.distributed import Ranks
from kukla.pipeline.train.loop import init_rows, mean_norms
from kukla.pipeline.train.sweep import build_trainees, train_step
from kukla.storage import ActivationStream, open_store

REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH = 40, 256


def _one_process(config: TrainConfig, *, split_loss: bool) -> dict[str, torch.Tensor]:
    """One process stepping on both ranks' rows of each step.

    split_loss=False: the trainer's step on the concatenated global batch.
    split_loss=True: by hand, the mean of the two halves' losses — the gradient DDP should compute exactly.
    """
    store = open_store(config.store)
    one = Ranks(rank=0, world=1, device=torch.device("cpu"))
    [member] = config.members(16, 16)
    [trainee] = build_trainees(config, [member], one, mean_norms(store, config), init_rows(store, config))
    dictionary = trainee.dictionary
    streams = [ActivationStream(store, [HOOK], BATCH // 2, rank=r, world=2, epochs=10, seed=config.seed[0])
               for r in (0, 1)]
    for step, (a, b) in enumerate(zip(*streams)):
        if step == STEPS:
            break
        if not split_loss:
            train_step([trainee], (torch.cat([a.acts[0], b.acts[0]]),), step, STEPS, config, one)
            continue
        fired = torch.zeros(64, dtype=torch.bool)
        for half in (a, b):
            out = dictionary.training_loss(half.acts[0])
            (out.loss / 2).backward()
            fired |= out.fired
        dictionary.project_decoder_grads()
        torch.nn.utils.clip_grad_norm_(dictionary.parameters(), config.grad_clip)
        for group in trainee.optimizer.param_groups:
            group["lr"] = learning_rate(config, trainee.base_lr, step, STEPS)
        trainee.optimizer.step()
        trainee.optimizer.zero_grad()
        dictionary.normalize_decoder()
        dictionary.update_dead(fired, BATCH)
    return dictionary.state_dict()


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(store: Path, tmp_path: Path) -> None:
    flags = ["--hook", HOOK, "--out", str(tmp_path), "--arch", "topk", "--width", "64", "--k", "4",
             "--batch-size", str(BATCH), "--tokens", str(BATCH * STEPS), "--checkpoint-every", "0",
             "--threads", "1", "--device", "cpu"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "kukla.cli.train", str(store), *flags], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    state = checkpoint.load_state(checkpoint.latest_checkpoint(tmp_path))
    assert state["world"] == 2 and [s["rank"] for s in state["streams"]] == [0, 1]
    ddp = state["members"]["topk-w64-k4-s0"]["dictionary"]

    config = TrainConfig(store=store, out=tmp_path / "ref", hook=HOOK, arch="topk", width=[64], k=[4],
                         batch_size=BATCH, tokens=BATCH * STEPS, threads=1)
    exact = _one_process(config, split_loss=True)
    whole_batch = _one_process(config, split_loss=False)
    # fired masks are OR-ed over ranks: the dead-latent counters equal the one-process ones exactly
    assert torch.equal(ddp["tokens_since_fired"], whole_batch["tokens_since_fired"])
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        scale = whole_batch[name].abs().max().clamp_min(1e-6)
        # the all-reduced gradient is the mean of the ranks' gradients, up to float rounding
        assert (ddp[name] - exact[name]).abs().max() / scale < 1e-4, name
        # the global batch's own loss normalises the FVU by all rows' variance, not each rank's: close
        assert (ddp[name] - whole_batch[name]).abs().max() / scale < 5e-2, name
