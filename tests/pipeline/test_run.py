"""`kukla run`: one file drives harvest → train → evaluate with the stages' own configs, and a
rerun keeps what is finished. Runs on the toy-tree source, so it takes seconds."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kukla.cli.app import app
from kukla.config import from_dict
from kukla.errors import ConfigError, KuklaError
from kukla.pipeline.evaluate.config import EvaluateConfig
from kukla.pipeline.harvest.config import HarvestConfig
from kukla.pipeline.run import build_pipeline
from kukla.pipeline.train.config import TrainConfig
from kukla.storage import open_store

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

TINY = """\
[run]
out = "{out}"
device = "cpu"

[harvest]
source = "toy-tree"
toy.tree = [4, 2]
toy.dim = 16
toy.p_root = 0.2
tokens = 6000
segment_windows = 8

{train}
[evaluate]
"""

TRAIN = """\
[[train]]
arch = "{arch}"
width = [32]
k = [2]
tokens = 12000
batch_size = 500
init_tokens = 500
calibration_tokens = 60
threads = 1
"""


def tiny_pipeline(out: Path) -> str:
    """A toy-source run file: a Matryoshka BatchTopK (levels 4, 32) and a plain BatchTopK."""
    matryoshka = TRAIN.format(arch="matryoshka-batchtopk") + "levels = [4, 32]\n"
    return TINY.format(out=out.as_posix(), train=matryoshka + "\n" + TRAIN.format(arch="batchtopk"))


def _files(folder: Path, suffix: str = "") -> dict[Path, int]:
    """Every file under `folder` (ending in `suffix`) and its modification time in ns."""
    return {p: p.stat().st_mtime_ns for p in folder.rglob(f"*{suffix}") if p.is_file()}


def _weights(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*.safetensors")}


@pytest.mark.slow
def test_one_file_runs_all_stages_and_a_rerun_keeps_finished_work(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text(tiny_pipeline(tmp_path / "run"))
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    report = tmp_path / "run" / "report"
    assert f"report: {report / 'report.html'}" in result.output
    assert (report / "report.html").stat().st_size > 0

    # Both training runs read the harvest's store, and evaluate compared all their dictionaries.
    store = open_store(tmp_path / "run" / "store.zarr")
    assert store.finalized and store.n_rows == 6000
    dictionaries = sorted(p.parent for p in (tmp_path / "run" / "dictionaries").glob("*/*/kukla.json"))
    assert [p.name for p in dictionaries] == ["batchtopk-w32-k2-s0", "matryoshka-batchtopk-w32-k2-s0"]
    for directory in dictionaries:
        assert store.fingerprint in (directory / "kukla.json").read_text()
    metrics = json.loads((report / "metrics.json").read_text())
    assert json.dumps(metrics).count("batchtopk-w32-k2-s0") >= 2

    # A rerun keeps the store untouched, does not train again, and writes the report again.
    store_files = _files(tmp_path / "run" / "store.zarr")
    weights = _weights(tmp_path / "run" / "dictionaries")
    report_before = (report / "metrics.json").stat().st_mtime_ns
    again = runner.invoke(app, ["run", str(config)])
    assert again.exit_code == 0, again.output
    assert _files(tmp_path / "run" / "store.zarr") == store_files
    assert _weights(tmp_path / "run" / "dictionaries") == weights  # not trained again
    assert (report / "metrics.json").stat().st_mtime_ns > report_before


def _sections(out: Path) -> dict:
    return tomllib.loads(tiny_pipeline(out))


def test_stage_sections_are_the_stage_configs_with_paths_joined(tmp_path: Path) -> None:
    pipeline = build_pipeline(_sections(tmp_path))
    sections = _sections(tmp_path)
    store = tmp_path / "store.zarr"
    assert pipeline.harvest == from_dict(HarvestConfig, {**sections["harvest"], "output": store, "device": "cpu"})
    for table, train in zip(sections["train"], pipeline.train):
        expected = {**table, "store": store, "hook": "toy", "out": tmp_path / "dictionaries" / table["arch"],
                    "resume": True, "device": "cpu"}
        assert train == from_dict(TrainConfig, expected)
    assert pipeline.evaluate == from_dict(EvaluateConfig, {
        "store": store, "out": tmp_path / "report", "device": "cpu",
        "dictionaries": [tmp_path / "dictionaries" / "matryoshka-batchtopk" / "matryoshka-batchtopk-w32-k2-s0",
                         tmp_path / "dictionaries" / "batchtopk" / "batchtopk-w32-k2-s0"]})


def test_settings_a_section_gives_win_over_the_joined_paths(tmp_path: Path) -> None:
    sections = _sections(tmp_path)
    sections["train"][0]["out"] = str(tmp_path / "mine")
    sections["evaluate"] = {"device": "cuda", "dictionaries": [str(tmp_path / "elsewhere")]}
    pipeline = build_pipeline(sections)
    assert pipeline.train[0].out == tmp_path / "mine"
    assert pipeline.evaluate is not None
    assert pipeline.evaluate.device == "cuda" and pipeline.evaluate.dictionaries == [tmp_path / "elsewhere"]


def test_a_misspelt_stage_setting_is_refused_with_the_nearest_name(tmp_path: Path) -> None:
    sections = _sections(tmp_path)
    sections["train"][1]["widht"] = [64]
    with pytest.raises(KuklaError, match=r"\[\[train\]\] #2: unknown setting 'widht' \(did you mean 'width'\?\)"):
        build_pipeline(sections)
    sections = _sections(tmp_path)
    sections["harvest"]["tokens"] = -1
    with pytest.raises(ConfigError, match="tokens: must be positive"):
        build_pipeline(sections)


def test_two_train_runs_may_not_share_an_output_folder(tmp_path: Path) -> None:
    sections = _sections(tmp_path)
    sections["train"][1]["arch"] = "matryoshka-batchtopk"
    with pytest.raises(ConfigError, match="same folder"):
        build_pipeline(sections)


def test_a_stage_to_run_needs_its_section(tmp_path: Path) -> None:
    sections = _sections(tmp_path)
    del sections["evaluate"]
    with pytest.raises(KuklaError, match=r"no \[evaluate\] section"):
        build_pipeline(sections)
    sections["run"]["stages"] = ["harvest", "train"]
    assert build_pipeline(sections).evaluate is None


def test_a_finalized_store_of_another_harvest_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text(tiny_pipeline(tmp_path).replace('[run]\n', '[run]\nstages = ["harvest"]\n'))
    assert runner.invoke(app, ["run", str(config)]).exit_code == 0
    config.write_text(config.read_text().replace("tokens = 6000", "tokens = 7000"))
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2
    assert "holds a store of a different run" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_example_run_files_are_valid(example: Path) -> None:
    result = runner.invoke(app, ["run", "--check", str(example)])
    assert result.exit_code == 0, result.output
    settings = json.loads(result.output)
    assert settings["evaluate"]["dictionaries"]
    assert all(t["store"] == settings["harvest"]["output"] for t in settings["train"])


def test_a_job_running_only_later_stages_finds_the_store_of_the_harvest_section(tmp_path: Path) -> None:
    pipeline = build_pipeline(_sections(tmp_path), stages=["train", "evaluate"])
    assert pipeline.harvest is None
    assert [t.store for t in pipeline.train] == [str(tmp_path / "store.zarr")] * 2
    assert all(t.hook == "toy" for t in pipeline.train)
    assert pipeline.evaluate is not None and pipeline.evaluate.store == str(tmp_path / "store.zarr")


def test_a_job_running_only_evaluate_finds_the_dictionaries_of_the_train_sections(tmp_path: Path) -> None:
    """The last job of a batch pipeline evaluates what the training jobs wrote, from the same file."""
    everything = build_pipeline(_sections(tmp_path))
    pipeline = build_pipeline(_sections(tmp_path), stages=["evaluate"])
    assert pipeline.harvest is None and pipeline.train == []
    assert pipeline.evaluate is not None and pipeline.evaluate.dictionaries == everything.evaluate.dictionaries
    assert len(pipeline.evaluate.dictionaries) == 2 and pipeline.evaluate.store == str(tmp_path / "store.zarr")
