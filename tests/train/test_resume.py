"""A run killed mid-way (SIGKILL, a real subprocess) and resumed ends with the weights of a run never stopped,
and logs to the W&B run it started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
from conftest import HOOK, TARGET
from safetensors.torch import load_file
from stores import write_store
from typer.testing import CliRunner

from kukla.cli.app import train_command as command
from kukla.config import from_dict
from kukla.errors import KuklaError
from kukla.pipeline.train import TrainConfig, WandbConfig, checkpoint, train
from kukla.pipeline.train.log import wandb_run_id

REPO = Path(__file__).resolve().parents[2]
NAME = "matryoshka-prefix-w64-k4-s0"


def _flags(store: Path, out: Path, *extra: str) -> list[str]:
    return [str(store), "--hook", HOOK, "--out", str(out), "--arch", "matryoshka-prefix", "--width", "64",
            "--k", "4", "--n-prefixes", "3", "--batch-size", "128", "--tokens", str(128 * 120),
            "--checkpoint-every", "20", "--log-every", "20", "--dead-tokens", "2000", "--threads", "1", *extra]


def _config(store: Path, out: Path, **changes: object) -> TrainConfig:
    """The config the CLI builds from `_flags` (same defaults, so runs are comparable)."""
    flags = _flags(store, out)[1:]
    data = {flags[i][2:].replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}
    return from_dict(TrainConfig, {**data, "store": store, **changes})


@pytest.mark.slow
def test_run_killed_mid_way_and_resumed_matches_uninterrupted_run(store: Path, tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kukla", "train", *_flags(store, killed)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while checkpoint.latest_checkpoint(killed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = checkpoint.latest_checkpoint(killed)
    assert latest is not None and latest.name < "step-00000120", "the run finished before it was killed"
    assert not (killed / NAME).exists()

    train(_config(store, whole))
    train(_config(store, killed, resume=True))
    a = load_file(str(whole / NAME / "sae_weights.safetensors"))
    b = load_file(str(killed / NAME / "sae_weights.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    state_a = checkpoint.load_state(checkpoint.latest_checkpoint(whole))
    state_b = checkpoint.load_state(checkpoint.latest_checkpoint(killed))
    for key, value in state_a["members"][NAME]["dictionary"].items():
        assert torch.equal(value, state_b["members"][NAME]["dictionary"][key]), key
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "step" in line] == list(range(20, 121, 20))


def _wandb_run_ids(out: Path) -> list[str]:
    """The run id of every offline W&B run under out/wandb: each folder's (offline-run-<time>-<id>) and its log's."""
    ids = []
    for folder in (out / "wandb").glob("offline-run-*"):
        ids += [folder.name.rpartition("-")[2], *(log.stem.removeprefix("run-") for log in folder.glob("run-*.wandb"))]
    return ids


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_continues_its_wandb_run_when_resumed(store: Path,
                                                                                      tmp_path: Path) -> None:
    """The W&B run id lived only in checkpoints: a run killed before the first one started a second W&B run.

    The killed run gets a W&B service of its own, as a separate job would: an earlier test's wandb.init
    sets WANDB_SERVICE in this process, and a child sharing that service leaves its run open there
    ("run ID … is in use" when this process resumes it)."""
    out, long = tmp_path / "run", {"tokens": 128 * 400, "checkpoint_every": 0}
    flags = _flags(store, out, "--tokens", str(long["tokens"]), "--checkpoint-every", "0", "--wandb")
    proc = subprocess.Popen([sys.executable, "-m", "kukla", "train", *flags], cwd=REPO,
                            env={**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},  # see below
                                 "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists():  # W&B has started, and step 20 is logged
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest_checkpoint(out) is None, "the kill must land before the first checkpoint"

    train(_config(store, out, resume=True, wandb=WandbConfig(enabled=True), **long))
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2  # one folder per attempt (wandb sync joins them)
    ids = set(_wandb_run_ids(out))
    assert len(ids) == 1, ids  # it was one W&B run per attempt
    assert ids == {json.loads((out / "wandb_run.json").read_text())["id"]}


def test_a_checkpoint_of_an_older_kukla_continues_the_wandb_run_it_names(store: Path, tmp_path: Path) -> None:
    """Older kuklas kept the W&B run id in the checkpoint only (`wandb_id`), and no out/wandb_run.json."""
    short = {"tokens": 1280, "checkpoint_every": 0}
    train(_config(store, tmp_path, **short))
    latest = checkpoint.latest_checkpoint(tmp_path)
    checkpoint.save_state(latest, {**checkpoint.load_state(latest), "wandb_id": "older0run"})
    train(_config(store, tmp_path, resume=True, wandb=WandbConfig(enabled=True), **short))
    assert set(_wandb_run_ids(tmp_path)) == {"older0run"} == {json.loads((tmp_path / "wandb_run.json").read_text())["id"]}


def test_a_rerun_with_other_settings_gets_a_wandb_run_of_its_own(tmp_path: Path) -> None:
    """A run killed before its first checkpoint and rerun with, say, a smaller batch is another training:
    continuing its W&B run would mix the two runs' steps."""
    run = {"lr": 1e-3, "batch_size": 4096, "store": {"fingerprint": "f0"}}
    first = wandb_run_id(tmp_path, run, None)
    assert wandb_run_id(tmp_path, dict(reversed(list(run.items()))), None) == first  # the same run, any key order
    for other in ({**run, "batch_size": 2048}, {**run, "store": {"fingerprint": "f1"}}):
        assert wandb_run_id(tmp_path, other, None) != first


def test_existing_run_needs_resume_and_the_same_settings(store: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("train")(command)
    app.command("other")(lambda: None)
    runner = CliRunner()
    short = ["--tokens", "1280", "--checkpoint-every", "0"]
    first = runner.invoke(app, ["train", *_flags(store, tmp_path, *short)])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["train", *_flags(store, tmp_path, *short)])
    assert again.exit_code == 2 and "pass --resume" in again.output and "Traceback" not in again.output
    changed = runner.invoke(app, ["train", *_flags(store, tmp_path, *short, "--k", "8", "--resume")])
    assert changed.exit_code == 2 and "k differs" in changed.output
    finished = runner.invoke(app, ["train", *_flags(store, tmp_path, *short, "--resume")])
    assert finished.exit_code == 0 and str(tmp_path / NAME) in finished.output

    latest = checkpoint.latest_checkpoint(tmp_path)
    state = checkpoint.load_state(latest)
    checkpoint.save_state(latest, {**state, "format": 1})  # as an older kukla wrote it
    older = runner.invoke(app, ["train", *_flags(store, tmp_path, *short, "--resume")])
    assert older.exit_code == 2 and "checkpoint format 1" in older.output and "Traceback" not in older.output


def test_resume_on_a_store_of_other_rows_is_refused_and_on_a_moved_copy_continues(store: Path,
                                                                                   tmp_path: Path) -> None:
    """The store path may change between a run and its resume (a moved copy), its rows may not:
    the first steps on one store and the rest on another would be neither run."""
    out, short = tmp_path / "run", {"tokens": 1280, "checkpoint_every": 5}
    train(_config(store, out, **short))
    other = write_store(tmp_path / "other.zarr", 4096, {HOOK: 16, TARGET: 12}, seed=1)  # same meta, other rows
    with pytest.raises(KuklaError, match="holds other rows than the store the run"):
        train(_config(other, out, resume=True, **short))
    moved = Path(shutil.copytree(store, tmp_path / "moved.zarr"))
    assert train(_config(moved, out, resume=True, **short)) == [out / NAME]


def test_a_run_moved_to_another_out_path_resumes_there(store: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A preempted job rescheduled on another host may see its output folder at another mount
    point, or be given it relative to another working directory: the run is what the folder
    holds, not the path it was reached by."""
    whole, short = tmp_path / "whole", {"tokens": 1280, "checkpoint_every": 5}
    train(_config(store, whole, **short))
    moved = Path(shutil.copytree(whole, tmp_path / "elsewhere" / "moved"))
    # as a kill right after the step-5 checkpoint leaves it: step 10 and the final dictionary not yet written
    shutil.rmtree(moved / "checkpoints" / "step-00000010")
    shutil.rmtree(moved / NAME)
    (moved / "checkpoints" / "latest").write_text("step-00000005\n")
    monkeypatch.chdir(moved.parent)
    assert train(_config(store, Path("moved"), resume=True, **short)) == [Path("moved") / NAME]
    a = load_file(str(whole / NAME / "sae_weights.safetensors"))
    b = load_file(str(moved / NAME / "sae_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_resume_after_a_torn_metrics_line_logs_every_step_once(store: Path, tmp_path: Path) -> None:
    """A full disk or a power cut mid-append leaves half a line at the end of metrics.jsonl; the
    resume crashed on it with a JSONDecodeError."""
    short = {"tokens": 128 * 40, "checkpoint_every": 20, "log_every": 10}
    train(_config(store, tmp_path, **short))
    log = tmp_path / "metrics.jsonl"
    whole = log.read_text()
    log.write_text(whole + '{"step": 40, "tok')
    train(_config(store, tmp_path, resume=True, **short))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line.get("step") for line in lines] == [10, 20, 30, 40, None] and lines[-1]["final"]
