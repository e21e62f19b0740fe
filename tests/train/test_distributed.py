"""Two gloo ranks under torchrun train exactly the dictionary one process trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HOOK

from kukla.pipeline.dictionary.model import _LATENT_BUFFERS, _LATENT_DIM
from kukla.pipeline.train import checkpoint

REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH = 20, 256


def _train(store: Path, out: Path, arch: str, nproc: int, extra: list[str]) -> dict[str, torch.Tensor]:
    """A real `kukla train` run (under torchrun when nproc > 1); the final checkpoint's dictionary."""
    flags = ["--hook", HOOK, "--out", str(out), "--arch", arch, "--width", "512", "--k", "4",
             "--batch-size", str(BATCH), "--tokens", str(BATCH * STEPS), "--checkpoint-every", "0",
             "--dead-tokens", "512", "--log-every", "4", "--threads", "1", "--device", "cpu", *extra]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    run = subprocess.run([sys.executable, *launcher, "-m", "kukla", "train", str(store), *flags], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    state = checkpoint.load_state(checkpoint.latest_checkpoint(out))
    assert state["world"] == nproc
    [member] = state["members"].values()
    return member["dictionary"]


def _in_order_of(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`one`'s latents in the order of their matches in `two` (by decoder cosine), after checking
    that the matching is a permutation that only swaps near neighbours in the contribution order."""
    cosine = torch.nn.functional.normalize(two["W_dec"], dim=1) @ torch.nn.functional.normalize(one["W_dec"], dim=1).T
    match = cosine.argmax(dim=1)
    width = match.numel()
    assert match.unique().numel() == width, "not a permutation"
    moved = match != torch.arange(width)
    assert int(moved.sum()) <= width // 50 and int((match - torch.arange(width)).abs().max()) <= 2, match[moved]
    per_latent = {**_LATENT_DIM, **dict.fromkeys(_LATENT_BUFFERS, 0)}  # what reordering permutes
    return {name: t.index_select(per_latent[name], match) if name in per_latent else t for name, t in one.items()}


@pytest.mark.slow
@pytest.mark.parametrize("arch,extra", [("batchtopk", []), ("matryoshka-batchtopk", []), ("matryoshka-prefix", []),
                                        ("matryoshka-prefix", ["--resample-at", "0.5"]),
                                        ("matryoshka-prefix", ["--resample-at", "0.5", "--reorder-latents"])])
def test_two_gloo_ranks_train_the_same_dictionary_as_one_process(store: Path, tmp_path: Path, arch: str,
                                                                 extra: list[str]) -> None:
    """With --resample-at every rank restarts the same latents at step 10, from the whole global batch.
    With --reorder-latents too, two latents whose running contributions differ only by the float
    noise of another summation order may sort the other way round: equal up to such swaps."""
    one = _train(store, tmp_path / "one", arch, 1, extra)
    two = _train(store, tmp_path / "two", arch, 2, extra)
    if "--reorder-latents" in extra:
        one = _in_order_of(one, two)
    # the same global batches, BatchTopK's cutoff, the variances over the global batch and (sampled
    # prefixes) the same draws on every rank: the same steps
    assert torch.equal(two["tokens_since_fired"], one["tokens_since_fired"])
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        # relative to the whole tensor: float sums in another order differ by ~1e-7, and Adam
        # turns that into up to half a step (lr ≈ 1.1e-3) on the few entries whose gradients are
        # near zero: 2.5e-4 on b_enc's norm on an AMD EPYC host. A wrong cutoff or share gave 0.26.
        relative = float((two[name] - one[name]).norm() / one[name].norm())
        assert relative < 1e-3, (name, relative)
    # latents died and aux-k trained them, so its global normalisation was part of what matched
    logged = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert max(line.get("aux", 0.0) for line in logged) > 0
