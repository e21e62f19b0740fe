"""Input that used to be accepted and must not be: TOML booleans as numbers, and a dataset
file that does not exist read as a Hub dataset name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kukla.cli.app import app
from kukla.cli.app import FinalizeConfig, ImportConfig
from kukla.config import DEFAULT_DEVICE, Bytes, from_dict, resolve_device
from kukla.errors import ConfigError, KuklaError
from kukla.pipeline.evaluate.config import EvaluateConfig
from kukla.pipeline.harvest.config import HarvestConfig
from kukla.pipeline.run import DemoConfig
from kukla.pipeline.train.config import TrainConfig
from kukla.pipeline.text import iter_texts


def test_a_toml_boolean_is_not_taken_as_a_number(tmp_path: Path) -> None:
    config = tmp_path / "h.toml"
    config.write_text('[harvest]\ntokens = true\n')
    result = CliRunner().invoke(app, ["harvest", str(tmp_path / "s"), "--config", str(config)])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and errors == ["error: tokens: true is a boolean; give a number"], result.output
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="memory_budget: cannot read False as a size"):
        from_dict(HarvestConfig, {"output": "s", "source": "toy-tree", "memory_budget": False})
    assert from_dict(HarvestConfig, {"output": "s", "source": "toy-tree", "keep_special_tokens": True}).keep_special_tokens


@pytest.mark.parametrize("dataset", ["data/missing.jsonl", "./texts", "missing.txt"])
def test_a_dataset_path_that_does_not_exist_is_named_as_a_missing_file(dataset: str) -> None:
    with pytest.raises(KuklaError, match=r"dataset file .* does not exist: check the path"):
        next(iter_texts(dataset, None, "train", None, "text"))


def test_a_memory_budget_too_small_is_refused_before_a_harvest_writes_anything(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["harvest", str(tmp_path / "s"), "--source", "toy-tree", "--tokens", "256",
                                      "--memory-budget", "10kB"])
    assert result.exit_code == 2 and "memory budget 10000 bytes is too small" in result.output, result.output
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("cls, fields", [
    (HarvestConfig, {"output": "s", "source": "toy-tree"}), (FinalizeConfig, {"path": "s"}),
    (ImportConfig, {"out": "s", "hook": ["h=x.npy"]}),
])
def test_every_memory_budget_is_one_size_type_with_one_default(cls: type, fields: dict) -> None:
    assert from_dict(cls, fields).memory_budget == 2 * 2**30
    for text, size in [("512MiB", 512 * 2**20), ("8GB", 8 * 10**9), ("1e9", 10**9), (4096, 4096), ("2 GiB", 2 * 2**30)]:
        budget = from_dict(cls, {**fields, "memory_budget": text}).memory_budget
        assert budget == size and isinstance(budget, Bytes)
    with pytest.raises(ConfigError, match="memory_budget: cannot read '2 gallons' as a size"):
        from_dict(cls, {**fields, "memory_budget": "2 gallons"})
    assert str(Bytes(2 * 2**30)) == "2GiB" and str(Bytes(512 * 10**6)) == "512MB" and str(Bytes(1234)) == "1234B"
    with pytest.raises(KuklaError, match=r"unknown setting 'memory_budget_gb' \(did you mean 'memory_budget'\?\)"):
        from_dict(HarvestConfig, {"output": "s", "source": "toy-tree", "memory_budget_gb": 2.0})  # the old GB key


def test_every_stage_defaults_to_the_same_device_and_resolves_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = {cls: next(f.default for f in dataclasses.fields(cls) if f.name == "device")
                for cls in (HarvestConfig, TrainConfig, EvaluateConfig, DemoConfig)}
    assert set(defaults.values()) == {DEFAULT_DEVICE}
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert from_dict(HarvestConfig, {"output": "s", "source": "toy-tree"}).device == expected
    assert from_dict(EvaluateConfig, {"dictionaries": ["d"], "store": "s", "out": "o"}).device == expected
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == "cuda:3"  # torchrun: each rank its own GPU
