"""The README's generated parts (configuration reference, benchmark figures) are up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.cli import config_commands

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_reference_and_figures_are_regenerated_from_the_code() -> None:
    script = _script()
    readme = (ROOT / "README.md").read_text()
    assert readme == script.generated_readme(readme), "README.md is stale: run python scripts/config_reference.py"


def test_reference_covers_every_command_of_the_cli() -> None:
    script = _script()
    documented = {command: cls for command, cls, _, _ in script.COMMANDS}
    cli = {name: command.callback.config_class for name, command in config_commands().items()}
    assert {"kukla train", "kukla store info", "kukla store verify"} <= set(cli)
    assert {name: documented.get(name) for name in cli} == cli


def test_reference_documents_every_setting_of_every_stage() -> None:
    from kukla.config import settings

    script = _script()
    reference = script.reference()
    for _, cls, arguments, _ in script.COMMANDS:
        for setting in settings(cls):
            row = f"`{setting.key.upper()}` (argument" if setting.key in arguments else f"`{setting.flag}` (`{setting.key}`)"
            assert row in reference, (cls.__name__, setting.key)
    for key in ("toy.dim", "absorption.words", "downstream.contexts", "wandb.project"):  # sections are listed by their dotted keys
        assert f"(`{key}`)" in reference, key
    assert "TOML table `[harvest.toy]`" in reference and "TOML table `[evaluate.absorption]`" in reference
    assert "<class" not in reference and "typing." not in reference  # every type has a reader's name
