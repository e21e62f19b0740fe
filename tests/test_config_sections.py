"""Nested config sections (`dataset`, `toy`, `absorption`, `downstream`) and the two dtype types:
one definition each, filled alike by TOML tables, dotted keys, Python and flags."""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from kukla.cli.app import app
from kukla.cli.options import config_command
from kukla.cli.app import ImportConfig
from kukla.config import ModelDtype, StoreDtype, from_dict, read_toml, settings, to_dict, torch_dtype
from kukla.errors import ConfigError, KuklaError
from kukla.pipeline.evaluate import AbsorptionConfig, DownstreamConfig, EvaluateConfig
from kukla.pipeline.harvest import DatasetConfig, HarvestConfig, ToyConfig
from kukla.pipeline.models import load_model
from kukla.pipeline.run import build_pipeline
from kukla.pipeline.train import TrainConfig, WandbConfig
from kukla.storage import StoreWriter

runner = CliRunner()
EVAL = {"dictionaries": ["d"], "store": "s", "out": "o"}
TRAIN = {"store": "s", "out": "o", "hook": "resid_post:0"}
TEXT = {"output": "s", "dataset": "t.txt", "hook": ["resid_post:0"]}


def _capture(cls: type, section: str, argument: str) -> tuple[typer.Typer, list]:
    """The real generated command for `cls`, keeping the config it builds instead of running the stage."""
    seen: list = []
    demo_app = typer.Typer()
    demo_app.command("stage")(config_command(cls, seen.append, arguments=(argument,), section=section))
    demo_app.command("other")(lambda: None)
    return demo_app, seen


def test_a_section_reads_the_same_from_a_table_dotted_keys_an_inline_table_python_and_flags(tmp_path: Path) -> None:
    wanted = HarvestConfig(output="s", source="toy-tree", toy=ToyConfig(tree=[4, 2], dim=16, p_root=0.5))
    spellings = ['[harvest.toy]\ntree = [4, 2]\ndim = 16\np_root = 0.5\n',
                 '[harvest]\ntoy.tree = [4, 2]\ntoy.dim = 16\ntoy.p_root = 0.5\n',
                 '[harvest]\ntoy = { tree = [4, 2], dim = 16, p_root = 0.5 }\n']
    for i, text in enumerate(spellings):
        path = tmp_path / f"{i}.toml"
        path.write_text('[harvest]\noutput = "s"\nsource = "toy-tree"\n' + text.removeprefix("[harvest]\n"))
        assert from_dict(HarvestConfig, read_toml(path, "harvest")) == wanted, text
    stage, seen = _capture(HarvestConfig, "harvest", "output")
    result = runner.invoke(stage, ["stage", "s", "--source", "toy-tree", "--toy-tree", "4,2", "--toy-dim", "16",
                                   "--toy-p-root", "0.5"])
    assert result.exit_code == 0, result.output
    assert seen == [wanted]
    assert wanted.toy.p_child == ToyConfig().p_child  # unnamed settings keep the section's defaults


def test_a_flag_overrides_one_key_of_a_file_section_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "h.toml"
    path.write_text('[harvest]\nsource = "toy-tree"\n[harvest.toy]\ndim = 8\ntree = [3, 3]\n')
    stage, seen = _capture(HarvestConfig, "harvest", "output")
    result = runner.invoke(stage, ["stage", "s", "--config", str(path), "--toy-dim", "16"])
    assert result.exit_code == 0, result.output
    assert seen[0].toy == ToyConfig(tree=[3, 3], dim=16)


def test_a_plain_value_for_a_section_fills_its_main_setting() -> None:
    assert from_dict(EvaluateConfig, {**EVAL, "absorption": False}).absorption == AbsorptionConfig(enabled=False)
    assert from_dict(TrainConfig, {**TRAIN, "wandb": "true"}).wandb == WandbConfig(enabled=True)
    assert from_dict(HarvestConfig, TEXT).dataset == DatasetConfig("t.txt")


def test_the_dataset_reads_the_same_from_a_name_a_table_python_and_flags(tmp_path: Path) -> None:
    base = {"output": "s", "hook": ["resid_post:0"]}
    named = HarvestConfig(**base, dataset=DatasetConfig("wikitext"))
    assert from_dict(HarvestConfig, {**base, "dataset": "wikitext"}) == named == HarvestConfig(**base, dataset="wikitext")
    wanted = HarvestConfig(**base, dataset=DatasetConfig("wikitext", subset="wikitext-103-raw-v1", split="validation"))
    path = tmp_path / "h.toml"
    path.write_text('[harvest]\nhook = ["resid_post:0"]\n[harvest.dataset]\nname = "wikitext"\n'
                    'subset = "wikitext-103-raw-v1"\nsplit = "validation"\n')
    assert from_dict(HarvestConfig, {**read_toml(path, "harvest"), "output": "s"}) == wanted
    stage, seen = _capture(HarvestConfig, "harvest", "output")
    flags = ["--dataset", "wikitext", "--dataset-subset", "wikitext-103-raw-v1", "--dataset-split", "validation"]
    result = runner.invoke(stage, ["stage", "s", "--hook", "resid_post:0", *flags])
    assert result.exit_code == 0, result.output
    path.write_text('[harvest]\nhook = ["resid_post:0"]\ndataset = "wikitext"\n')  # flags join the file's name
    result = runner.invoke(stage, ["stage", "s", "--config", str(path), *flags[2:]])
    assert result.exit_code == 0, result.output
    assert seen == [wanted, wanted]


def test_old_spellings_on_the_command_line_are_refused_naming_the_new_flag(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones((10, 4), np.float32))
    for args, new in ((["harvest", str(tmp_path / "h"), "--source", "toy-tree", "--dtype", "bfloat16"], "model_dtype"),
                      (["store", "import", str(tmp_path / "s"), "--hook", f"a={tmp_path / 'a.npy'}",
                        "--dtype", "float32"], "store_dtype")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert f"setting 'dtype' is now '{new}'" in result.output and f"(flag --{new.replace('_', '-')})" in result.output
    assert not (tmp_path / "h").exists() and not (tmp_path / "s").exists()


def test_a_section_switch_keeps_the_short_flag() -> None:
    stage, seen = _capture(EvaluateConfig, "evaluate", "dictionaries")
    result = runner.invoke(stage, ["stage", "d", "--store", "s", "--out", "o", "--no-absorption", "--no-downstream",
                                   "--absorption-words", "50"])
    assert result.exit_code == 0, result.output
    assert seen[0].absorption == AbsorptionConfig(enabled=False, words=50)
    assert seen[0].downstream == DownstreamConfig(enabled=False)
    flags = {s.key: s.flag for s in settings(EvaluateConfig) + settings(TrainConfig)}
    assert flags["absorption.enabled"] == "--absorption" and flags["absorption.min_probe_f1"] == "--absorption-min-probe-f1"
    assert flags["wandb.enabled"] == "--wandb" and flags["wandb.project"] == "--wandb-project"
    flags = {s.key: s.flag for s in settings(HarvestConfig)}
    assert flags["dataset.name"] == "--dataset" and flags["dataset.text_column"] == "--dataset-text-column"
    stage, seen = _capture(TrainConfig, "train", "store")
    result = runner.invoke(stage, ["stage", "s", "--out", "o", "--hook", "resid_post:0", "--wandb", "--wandb-name", "r1"])
    assert result.exit_code == 0, result.output
    assert seen[0].wandb == WandbConfig(enabled=True, name="r1")


def test_errors_in_a_section_name_the_full_key(tmp_path: Path) -> None:
    result = runner.invoke(app, ["harvest", str(tmp_path / "s"), "--source", "toy-tree", "--toy-dim", "-1"])
    assert result.exit_code == 2 and "error: toy.dim: must be positive" in result.output, result.output
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match=r"^absorption\.min_probe_f1: must be between 0 and 1$"):
        from_dict(EvaluateConfig, {**EVAL, "absorption": {"min_probe_f1": 2}})
    with pytest.raises(ConfigError, match=r"^downstream\.contexts: cannot read 'many' as int$"):
        from_dict(EvaluateConfig, {**EVAL, "downstream": {"contexts": "many"}})
    with pytest.raises(ConfigError, match=r"^downstream\.require: contradicts --no-downstream"):
        from_dict(EvaluateConfig, {**EVAL, "downstream": {"enabled": False, "require": True}})
    with pytest.raises(KuklaError, match=r"unknown setting 'toy\.dmi' \(did you mean 'toy\.dim'\?\)"):
        from_dict(HarvestConfig, {"output": "s", "source": "toy-tree", "toy": {"dmi": 3}})
    with pytest.raises(ConfigError, match=r"^toy: is a section of settings, not 5"):
        from_dict(HarvestConfig, {"output": "s", "source": "toy-tree", "toy": 5})


@pytest.mark.parametrize("cls, base, old, message", [
    (HarvestConfig, {"output": "s", "source": "toy-tree"}, {"toy_dim": 64}, "'toy_dim' is now 'toy.dim': write toy.dim = 64"),
    (HarvestConfig, {"output": "s", "source": "toy-tree"}, {"toy_tree": [8, 2]},
     "'toy_tree' is now 'toy.tree': write toy.tree = [8, 2]"),
    (EvaluateConfig, EVAL, {"absorption_min_probe_f1": 0.5},
     "'absorption_min_probe_f1' is now 'absorption.min_probe_f1': write absorption.min_probe_f1 = 0.5"),
    (EvaluateConfig, EVAL, {"seed": 3}, "'seed' is now 'absorption.seed': write absorption.seed = 3"),
    (EvaluateConfig, EVAL, {"require_downstream": True},
     "'require_downstream' is now 'downstream.require': write downstream.require = true"),
    (EvaluateConfig, EVAL, {"downstream_contexts": 4}, "'downstream_contexts' is now 'downstream.contexts'"),
    (HarvestConfig, TEXT, {"dataset_subset": "en"},
     "'dataset_subset' is now 'dataset.subset': write dataset.subset = \"en\" (flag --dataset-subset)"),
    (HarvestConfig, TEXT, {"text_column": "body"}, "'text_column' is now 'dataset.text_column'"),
    (HarvestConfig, TEXT, {"split": "validation"}, "'split' is now 'dataset.split'"),
    (HarvestConfig, TEXT, {"revision": "v1"}, "'revision' is now 'dataset.revision'"),
    (HarvestConfig, TEXT, {"dtype": "bfloat16"},
     "'dtype' is now 'model_dtype': write model_dtype = \"bfloat16\" (flag --model-dtype)"),
    (ImportConfig, {"out": "s", "hook": ["a=a.npy"]}, {"dtype": "float32"},
     "'dtype' is now 'store_dtype': write store_dtype = \"float32\" (flag --store-dtype)"),
    (TrainConfig, TRAIN, {"wandb_project": "p"}, "'wandb_project' is now 'wandb.project': write wandb.project = \"p\""),
])
def test_an_old_flat_key_is_refused_naming_its_new_key(cls: type, base: dict, old: dict, message: str) -> None:
    with pytest.raises(KuklaError) as raised:
        from_dict(cls, {**base, **old}, source="run.toml [stage]")
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_run_file_with_an_old_toy_key_is_refused_before_any_stage_runs(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(f'[run]\nout = "{(tmp_path / "run").as_posix()}"\n[harvest]\nsource = "toy-tree"\ntoy_dim = 16\n'
                    '[[train]]\nwidth = [32]\nk = [2]\n[evaluate]\n')
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "error: " in result.output and "[harvest]: setting 'toy_dim' is now 'toy.dim': write toy.dim = 16" in result.output
    assert not (tmp_path / "run").exists()


def test_printed_settings_read_back_to_the_same_config() -> None:
    harvest = HarvestConfig(output="s", source="toy-tree", device="cpu", toy=ToyConfig(tree=[5, 2], noise=0.0))
    evaluate = EvaluateConfig(dictionaries=[Path("d")], store=Path("s"), out=Path("o"), device="cpu",
                              absorption=AbsorptionConfig(words=99, seed=4), downstream=DownstreamConfig(contexts=3))
    for config in (harvest, evaluate):
        plain = to_dict(config)
        assert isinstance(plain["toy" if config is harvest else "absorption"], dict)
        assert from_dict(type(config), plain) == config
    pipeline = build_pipeline({"harvest": {"source": "toy-tree", "toy": {"dim": 12}}, "train": [{"width": [32], "k": [2]}],
                               "evaluate": {"absorption": {"words": 7}}}, stages=["harvest", "train", "evaluate"])
    assert pipeline.harvest.toy.dim == 12 and pipeline.evaluate.absorption.words == 7


def _commands(group: typer.Typer) -> list:
    """Every command of the CLI, subcommand groups included."""
    found = [c.callback for c in group.registered_commands]
    return found + [c for g in group.registered_groups for c in _commands(g.typer_instance)]


def test_every_dtype_setting_of_every_command_is_a_model_dtype_or_a_store_dtype() -> None:
    fields = {(cmd.config_class, s.key): s.type for cmd in _commands(app) if hasattr(cmd, "config_class")
              for s in settings(cmd.config_class) if "dtype" in s.key}
    assert fields == {(HarvestConfig, "model_dtype"): ModelDtype, (HarvestConfig, "store_dtype"): StoreDtype,
                      (EvaluateConfig, "model_dtype"): ModelDtype, (ImportConfig, "store_dtype"): StoreDtype}
    by_name = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    for tp in (StoreDtype, ModelDtype):
        assert {name: torch_dtype(name) for name in typing.get_args(tp)} == by_name


def test_a_bad_dtype_gets_the_same_one_line_refusal_from_every_entry(tmp_path: Path) -> None:
    refusal = "'fp8' is not one of"
    with pytest.raises(ConfigError, match=f"^store_dtype: {refusal} bfloat16, float16, float32$"):
        from_dict(HarvestConfig, {"output": "s", "source": "toy-tree", "store_dtype": "fp8"})
    with pytest.raises(ConfigError, match=f"^model_dtype: {refusal} bfloat16, float16, float32$"):
        from_dict(EvaluateConfig, {**EVAL, "model_dtype": "fp8"})
    with pytest.raises(ConfigError, match=f"^dtype: {refusal} bfloat16, float16, float32$"):
        StoreWriter.open(tmp_path / "w", {"hooks": {"h": 4}}, dtype="fp8")
    with pytest.raises(ConfigError, match=f"^dtype: {refusal} bfloat16, float16, float32$"):
        load_model("google/gemma-3-270m", dtype="fp8")
    np.save(tmp_path / "a.npy", np.ones((10, 4), np.float32))
    result = runner.invoke(app, ["store", "import", str(tmp_path / "s"), "--hook", f"a={tmp_path / 'a.npy'}",
                                 "--store-dtype", "fp8"])
    assert result.exit_code == 2 and f"error: store_dtype: {refusal} bfloat16, float16, float32" in result.output
    assert not (tmp_path / "w").exists() and not (tmp_path / "s").exists()
