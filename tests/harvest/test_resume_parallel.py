"""Crashes and ranks change nothing: every planned token is stored exactly once, flagged alike."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from kukla.errors import KuklaError
from kukla.pipeline.harvest import HarvestConfig, harvest
from kukla.storage import finalize_store, finalize_worker, open_store
from tests.cli import kukla, one_line_error

HOOKS = ["resid_post:0", "mlp_out:1"]


def _config(model_dir: Path, texts: Path, out: Path, tokens: int, segment_windows: int) -> dict[str, str]:
    return {"model": str(model_dir), "dataset": str(texts), "hook": ",".join(HOOKS), "context-size": "16",
            "tokens": str(tokens), "segment-windows": str(segment_windows), "batch-size": "2",
            "store-dtype": "float32", "massive-ratio": "1.3", "output": str(out)}


def _cli_args(config: dict[str, str]) -> list[str]:
    flags = [arg for key, value in config.items() if key != "output" for arg in (f"--{key}", value)]
    return ["harvest", config["output"], *flags]


def _in_process(config: dict[str, str], model, **overrides) -> str:
    from kukla.config import from_dict

    settings = {key.replace("-", "_"): value for key, value in config.items()} | overrides
    return harvest(from_dict(HarvestConfig, settings), model=model)


def _sorted_rows(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.lexsort((rows["tokens/position"], rows["tokens/sequence"]))
    return {name: array[order] for name, array in rows.items()}


def _assert_same_rows(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    a, b = _sorted_rows(a), _sorted_rows(b)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=name)


def _assert_some_flagged(rows: dict[str, np.ndarray]) -> None:
    """The flags compared below must split the rows, or their equality would prove nothing."""
    assert 0 < rows["tokens/massive"].sum() < len(rows["tokens/massive"])


def _committed(out: Path) -> int:
    journal = out / "_parts" / "rank-00000" / "journal"
    return len(list(journal.glob("seg-*.json"))) if journal.exists() else 0


@pytest.mark.slow
def test_resumed_harvest_stores_every_token_once(tiny_model_dir: Path, tiny_model, long_texts: Path,
                                                 tmp_path: Path, kukla_cli, store_rows) -> None:
    read_rows, rows_by_token = store_rows
    out = tmp_path / "killed.zarr"
    config = _config(tiny_model_dir, long_texts, out, tokens=1200, segment_windows=1)
    first = kukla_cli(*_cli_args(config))
    deadline = time.monotonic() + 600
    while _committed(out) < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    committed = _committed(out)
    assert 3 <= committed < 1200 // 15, "the kill must land mid-way"
    with pytest.raises(KuklaError, match="not finalized"):
        open_store(str(out))

    second = kukla_cli(*_cli_args(config))
    _, err = second.communicate(timeout=900)
    assert second.returncode == 0, err
    resumed = read_rows(str(out))
    reference = read_rows(_in_process(config | {"output": str(tmp_path / "whole.zarr")}, tiny_model))
    assert len(rows_by_token(resumed)) == 1200
    _assert_some_flagged(reference)
    _assert_same_rows(resumed, reference)  # tokens/massive too: the resumed run re-derives the same reference


@pytest.mark.slow
def test_two_rank_harvest_equals_one_rank_harvest(tiny_model_dir: Path, tiny_model, long_texts: Path,
                                                  tmp_path: Path, kukla_cli, store_rows) -> None:
    read_rows, _ = store_rows
    config = _config(tiny_model_dir, long_texts, tmp_path / "two.zarr", tokens=600, segment_windows=3)
    rank0 = kukla_cli(*_cli_args(config), env={"RANK": "0", "WORLD_SIZE": "2"})  # torchrun's variables
    _in_process(config, tiny_model, rank=1, world=2, finalize=False)
    _, err = rank0.communicate(timeout=900)
    assert rank0.returncode == 0, err
    two = open_store(config["output"])
    assert two.meta["world"] == 2 and two.read("static/harvest_rows_rank_00001")[0] > 0
    one = read_rows(_in_process(config | {"output": str(tmp_path / "one.zarr")}, tiny_model))
    _assert_some_flagged(one)
    _assert_same_rows(read_rows(config["output"]), one)  # tokens/massive too: rank 1 never owned segment 0


def test_ranks_on_hosts_that_mount_the_inputs_elsewhere_write_one_store(tiny_model_dir: Path, tiny_model,
                                                                        long_texts: Path, tmp_path: Path,
                                                                        store_rows) -> None:
    """A cluster's ranks (or a preempted rank rescheduled on another host) may reach the same
    model folder and text file by other paths; the run is the same, and the store says so. Other
    text under the same name is another run, and the refusal names what differs."""
    read_rows, _ = store_rows
    config = _config(tiny_model_dir, long_texts, tmp_path / "two.zarr", tokens=600, segment_windows=3)
    elsewhere = tmp_path / "other-host"
    moved = {"model": str(shutil.copytree(tiny_model_dir, elsewhere / tiny_model_dir.name)),
             "dataset": str(shutil.copy(long_texts, elsewhere / long_texts.name))}
    _in_process(config | moved, tiny_model, rank=1, world=2, finalize=False)  # this rank creates the store
    _in_process(config, tiny_model, rank=0, world=2)
    store = open_store(config["output"])
    assert store.where == {"model": moved["model"], "dataset": moved["dataset"]}
    assert store.meta["dataset"]["name"] == long_texts.name and store.meta["model"]["name"] == tiny_model_dir.name
    one = read_rows(_in_process(config | {"output": str(tmp_path / "one.zarr")}, tiny_model))
    _assert_same_rows(read_rows(config["output"]), one)

    with open(moved["dataset"], "a") as file:
        file.write(json.dumps({"text": "More text than the first run read."}) + "\n")
    with pytest.raises(KuklaError, match=r"holds a store of a different run \(dataset\.bytes: \d+ there, \d+ now\)"):
        _in_process(config | moved | {"output": str(tmp_path / "one.zarr")}, tiny_model)


def test_another_checkpoint_in_a_folder_of_the_same_name_is_another_run(tiny_model_dir: Path, texts: Path,
                                                                        tmp_path: Path) -> None:
    """A local model stood for itself by its folder's name and architecture alone, so a rerun with
    another checkpoint (runs/b/final for runs/a/final) resumed the store and mixed the two models' rows."""
    from safetensors.torch import load_file, save_file

    other = Path(shutil.copytree(tiny_model_dir, tmp_path / "runs-b" / tiny_model_dir.name))
    weights = load_file(other / "model.safetensors")
    save_file({name: value * 1.01 for name, value in weights.items()}, other / "model.safetensors",
              metadata={"format": "pt"})
    config = _config(tiny_model_dir, texts, tmp_path / "s.zarr", tokens=200, segment_windows=3)
    _in_process(config, None)
    with pytest.raises(KuklaError, match=r"different run \(model\.weights: "):
        _in_process(config | {"model": str(other)}, None)


def _state(out: Path) -> str | None:
    try:
        return json.loads((out / "zarr.json").read_text())["attributes"]["kukla"]["state"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


@pytest.mark.slow
def test_harvest_killed_in_its_finalize_finishes_when_rerun(tiny_model_dir: Path, tiny_model, texts: Path,
                                                            tmp_path: Path, kukla_cli) -> None:
    """A job preempted after its rows are written (state finalizing) is requeued with the same
    command: it must finish the shuffle, and a rerun of a finished harvest must succeed too."""
    out = tmp_path / "killed.zarr"
    config = _config(tiny_model_dir, texts, out, tokens=300, segment_windows=2)
    first = kukla_cli(*_cli_args(config))
    deadline = time.monotonic() + 600
    while _state(out) != "finalizing" and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    assert _state(out) == "finalizing", "the kill must land inside finalize"
    for _ in range(2):  # the resumed finalize, then a rerun of the finished harvest
        rerun = kukla_cli(*_cli_args(config))
        _, err = rerun.communicate(timeout=900)
        assert rerun.returncode == 0, err
    reference = open_store(_in_process(config | {"output": str(tmp_path / "whole.zarr")}, tiny_model))
    resumed = open_store(str(out))
    assert resumed.specs.keys() == reference.specs.keys()
    for name in reference.specs:
        np.testing.assert_array_equal(resumed.read_stored(name), reference.read_stored(name), err_msg=name)


@pytest.mark.slow
def test_every_rank_refuses_shuffle_settings_the_store_has_fixed(tiny_model_dir: Path, tiny_model, texts: Path,
                                                                 tmp_path: Path) -> None:
    """A retried job on a finished (or finalizing) store: rank 0 refused a changed seed or holdout
    while rank 1 exited 0, as if the settings had been applied."""
    written = tmp_path / "written.zarr"
    config = _config(tiny_model_dir, texts, written, tokens=300, segment_windows=2)
    for rank in (1, 0):
        _in_process(config, tiny_model, rank=rank, world=2, finalize=False)
    finalized, finalizing = (shutil.copytree(written, tmp_path / name) for name in ("finalized", "finalizing"))
    finalize_store(finalized)
    finalize_worker(finalizing, 0, 2)  # does every unit, but only the commit marks the store finalized
    held_out = open_store(str(finalized)).holdout_rows
    cases = [(finalized, ["--seed", "5"], f"already finalized with shuffle seed 0 and {held_out} held-out rows"),
             (finalized, ["--holdout-rows", "7"], "already finalized with shuffle seed 0"),
             (finalizing, ["--seed", "5"], "was started with seed 0: rerun with that seed")]
    for store, changed, refusal in cases:
        before = (store / "zarr.json").read_bytes()
        args = [*_cli_args(config | {"output": str(store)}), *changed, "--world", "2"]
        errors = {one_line_error(*kukla(*args, "--rank", str(rank)), refusal) for rank in (0, 1)}
        assert len(errors) == 1, errors  # the same line from every rank
        assert (store / "zarr.json").read_bytes() == before
