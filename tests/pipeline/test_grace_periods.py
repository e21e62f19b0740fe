"""The cluster files give kukla's SIGTERM handling time to finish: Kubernetes waits
terminationGracePeriodSeconds before SIGKILL, Slurm sends SIGTERM ahead of the time limit,
and torchrun waits for its workers' checkpoint inside that time."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
#: Seconds each stage needs after SIGTERM: harvest and finalize stop at once; train writes a checkpoint.
NEEDED = {"harvest": 60, "finalize": 60, "train": 300, "run": 300}


@pytest.mark.parametrize("stage", ["harvest", "finalize", "train"])
def test_kubernetes_jobs_have_a_grace_period_that_fits(stage: str) -> None:
    pod = yaml.safe_load((DOCKER / "k8s" / f"{stage}.yaml").read_text())["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= NEEDED[stage]
    env = {e["name"]: e.get("value") for c in pod["containers"] for e in c.get("env", [])}
    if stage == "train":
        assert NEEDED["train"] <= int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < grace


@pytest.mark.parametrize("stage", ["harvest", "finalize", "train", "run"])
def test_slurm_jobs_get_sigterm_before_their_time_limit(stage: str) -> None:
    text = (DOCKER / "slurm" / f"{stage}.sbatch").read_text()
    match = re.search(r"^#SBATCH --signal=TERM@(\d+)$", text, re.M)
    assert match and int(match.group(1)) >= NEEDED[stage], text
    if stage == "train":
        timeout = re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT=(\d+)", text)
        assert timeout and NEEDED["train"] <= int(timeout.group(1)) < int(match.group(1))
