"""Input that used to be accepted and must not be: TOML booleans as numbers, and a dataset
file that does not exist read as a Hub dataset name."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kukla.cli.app import app
from kukla.config import from_dict
from kukla.errors import ConfigError, KuklaError
from kukla.pipeline.harvest.config import HarvestConfig
from kukla.pipeline.harvest.text import iter_texts


def test_a_toml_boolean_is_not_taken_as_a_number(tmp_path: Path) -> None:
    config = tmp_path / "h.toml"
    config.write_text('[harvest]\ntokens = true\n')
    result = CliRunner().invoke(app, ["harvest", str(tmp_path / "s"), "--config", str(config)])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and errors == ["error: tokens: true is a boolean; give a number"], result.output
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="memory_budget_gb: false is a boolean"):
        from_dict(HarvestConfig, {"output": "s", "source": "toy-tree", "memory_budget_gb": False})
    assert from_dict(HarvestConfig, {"output": "s", "source": "toy-tree", "keep_special_tokens": True}).keep_special_tokens


@pytest.mark.parametrize("dataset", ["data/missing.jsonl", "./texts", "missing.txt"])
def test_a_dataset_path_that_does_not_exist_is_named_as_a_missing_file(dataset: str) -> None:
    with pytest.raises(KuklaError, match=r"dataset file .* does not exist: check the path"):
        next(iter_texts(dataset, None, "train", None, "text"))


def test_a_memory_budget_too_small_is_refused_before_a_harvest_writes_anything(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["harvest", str(tmp_path / "s"), "--source", "toy-tree", "--tokens", "256",
                                      "--memory-budget-gb", "0.00001"])
    assert result.exit_code == 2 and "memory budget 10000 bytes is too small" in result.output, result.output
    assert not (tmp_path / "s").exists()
