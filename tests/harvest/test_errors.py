"""Bad input gets one line that says what to do, before any work, and loses nothing."""

from __future__ import annotations

import resource
import signal
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kukla.cli.app import app
from kukla.config import from_dict
from kukla.errors import ConfigError, KuklaError
from kukla.pipeline.harvest import DatasetConfig, HarvestConfig, harvest
from kukla.pipeline.models import load_model
from kukla.storage import open_store


def _config(out: Path, texts: Path, **overrides) -> HarvestConfig:
    settings = dict(output=str(out), dataset=str(texts), hook=["resid_post:0"], context_size=16, tokens=200,
                    segment_windows=2)
    return HarvestConfig(**(settings | overrides))


def test_unknown_model_name_suggests_the_nearest_names() -> None:
    with pytest.raises(KuklaError, match="nearest: gpt2-small"):
        load_model("gpt2-smal")


def test_hub_model_offline_names_the_offline_path() -> None:
    with pytest.raises(KuklaError, match="save_pretrained.*pass that folder"):
        load_model("gpt2")


def test_missing_text_column_lists_the_columns(config_model, texts: Path, tmp_path: Path) -> None:
    with pytest.raises(KuklaError, match="no column 'body'.*text, id.*--dataset-text-column"):
        harvest(_config(tmp_path / "s.zarr", texts, dataset=DatasetConfig(str(texts), text_column="body")),
                model=config_model)
    assert not (tmp_path / "s.zarr").exists()


def test_empty_dataset_is_refused(config_model, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(KuklaError, match="empty"):
        harvest(_config(tmp_path / "s.zarr", empty), model=config_model)
    assert not (tmp_path / "s.zarr").exists()


def test_the_dataset_and_the_output_path_are_checked_before_the_model_loads(texts: Path, tmp_path: Path) -> None:
    nowhere = str(tmp_path / "no-model")  # loading it would fail with "unknown model"
    with pytest.raises(KuklaError, match="missing.jsonl does not exist"):
        harvest(_config(tmp_path / "s.zarr", tmp_path / "missing.jsonl", model=nowhere))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(KuklaError, match="is empty: give one that holds text"):
        harvest(_config(tmp_path / "s.zarr", tmp_path / "empty.txt", model=nowhere))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(KuklaError, match="output .*a-file is a file"):
        harvest(_config(tmp_path / "a-file", texts, model=nowhere))
    assert not (tmp_path / "s.zarr").exists()


def test_context_size_above_n_ctx_is_refused(config_model, texts: Path, tmp_path: Path) -> None:
    with pytest.raises(KuklaError, match="above the model's n_ctx 32"):
        harvest(_config(tmp_path / "s.zarr", texts, context_size=33), model=config_model)
    assert not (tmp_path / "s.zarr").exists()


def test_unknown_hook_and_layer_out_of_range_list_the_valid_ones(config_model, texts: Path, tmp_path: Path) -> None:
    with pytest.raises(KuklaError, match=r"layer 7 is out of range; this model has layers 0–2"):
        harvest(_config(tmp_path / "s.zarr", texts, hook=["resid_post:7"]), model=config_model)
    with pytest.raises(KuklaError, match="unknown hook 'blocks.0.hook_resid_pots'; valid: resid_pre, resid_mid"):
        harvest(_config(tmp_path / "s.zarr", texts, hook=["blocks.0.hook_resid_pots"]), model=config_model)
    with pytest.raises(KuklaError, match="unknown hook kind 'resid'"):
        harvest(_config(tmp_path / "s.zarr", texts, hook=["resid:0"]), model=config_model)
    assert not (tmp_path / "s.zarr").exists()


def test_another_runs_store_is_refused_unless_overwrite(config_model, texts: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    harvest(_config(out, texts), model=config_model)
    with pytest.raises(KuklaError, match="different run.*overwrite"):
        harvest(_config(out, texts, hook=["resid_post:1"]), model=config_model)
    assert open_store(str(out)).hooks == {"blocks.0.hook_resid_post": 16}  # untouched
    harvest(_config(out, texts, hook=["resid_post:1"], overwrite=True), model=config_model)
    assert open_store(str(out)).hooks == {"blocks.1.hook_resid_post": 16}


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="hook: give at least one hook"):
        HarvestConfig(output=str(tmp_path), dataset="x.txt")
    with pytest.raises(ConfigError, match="rank: must be in 0..1"):
        HarvestConfig(output=str(tmp_path), source="toy-tree", rank=2, world=2)
    with pytest.raises(ConfigError, match=r"toy\.p_child: must be a probability"):
        from_dict(HarvestConfig, {"output": str(tmp_path), "source": "toy-tree", "toy": {"p_child": 1.5}})
    with pytest.raises(ConfigError, match=r"holdout_rows: must be at least 0 and below tokens \(500\)"):
        HarvestConfig(output=str(tmp_path), source="toy-tree", tokens=500, holdout_rows=500)  # before any forward


def test_cli_prints_one_line_and_exits_2(texts: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["harvest", str(tmp_path / "s.zarr"), "--dataset", str(texts),
                                      "--model", str(tmp_path / "nowhere"), "--hook", "resid_post:0"])
    assert result.exit_code == 2
    assert "unknown model" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_full_disk_in_the_background_writer_is_one_line_and_the_rerun_resumes(
        tiny_model_dir: Path, tiny_model, long_texts: Path, tmp_path: Path, kukla_cli, store_rows) -> None:
    read_rows, rows_by_token = store_rows
    out = tmp_path / "full.zarr"
    flags = ["--model", str(tiny_model_dir), "--dataset", str(long_texts), "--hook", "resid_post:0",
             "--context-size", "16", "--tokens", "900", "--segment-windows", "4", "--batch-size", "2",
             "--store-dtype", "float32"]  # a segment's activations: 60 rows × 32 × 4 B = 7.7 kB

    def small_files() -> None:  # in the child: a file may not grow past 5 kB; the write fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (5000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    full = kukla_cli("harvest", str(out), *flags, preexec_fn=small_files)
    _, err = full.communicate(timeout=600)
    assert full.returncode == 2, err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "disk full" in line]
    assert "writing segment" in line and "rerun the same command to resume" in line

    rerun = kukla_cli("harvest", str(out), *flags)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    resumed = rows_by_token(read_rows(str(out)))
    whole = harvest(HarvestConfig(output=str(tmp_path / "whole.zarr"), model=str(tiny_model_dir),
                                  dataset=str(long_texts), hook=["resid_post:0"], context_size=16, tokens=900,
                                  segment_windows=4, batch_size=2, store_dtype="float32"), model=tiny_model)
    reference = rows_by_token(read_rows(whole))
    assert resumed.keys() == reference.keys() and len(resumed) == 900
    for key, row in reference.items():
        np.testing.assert_allclose(resumed[key]["acts/blocks.0.hook_resid_post"], row["acts/blocks.0.hook_resid_post"],
                                   atol=1e-6)


def test_a_jsonl_line_that_is_not_json_is_named(config_model, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut off\n')
    with pytest.raises(KuklaError, match=r"broken.jsonl line 2 is not JSON .*fix or remove that line"):
        harvest(_config(tmp_path / "s.zarr", broken), model=config_model)
    assert not (tmp_path / "s.zarr").exists()
