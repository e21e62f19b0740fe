"""The command line itself: version, help on every command, one-line errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import kukla
from kukla.cli.app import app
from kukla.cli.options import config_command
from kukla.config import field_docs, from_dict, load_config
from kukla.errors import ConfigError
from tests.cli import config_commands, stopped, stopping_at_read

runner = CliRunner()


def _commands(typer_app: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    names = [prefix + (c.name or c.callback.__name__,) for c in typer_app.registered_commands]
    for group in typer_app.registered_groups:
        names += _commands(group.typer_instance, prefix + (group.name,))
    return names


def test_every_command_has_help() -> None:
    for command in _commands(app):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


def test_help_shows_the_bracketed_parts_of_setting_docs() -> None:
    """Choices ([model|toy-tree]) and shapes ([rows, width]) are text, not markup that --help drops."""
    harvest = " ".join(runner.invoke(app, ["harvest", "--help"], env={"COLUMNS": "400"}).output.split())
    assert "[model|toy-tree]" in harvest and "[bfloat16|float16|float32]" in harvest and "under [harvest]" in harvest
    imported = " ".join(runner.invoke(app, ["store", "import", "--help"], env={"COLUMNS": "400"}).output.split())
    assert "([rows, width] or [..., width])" in imported and "[sequences, context_size]" in imported


@pytest.mark.parametrize("command, metavar", [(["harvest"], "size"), (["train"], "list of int"),
                                              (["evaluate"], "int or none"), (["store", "import"], "list of text")])
def test_help_names_each_settings_type_as_the_readme_does(command: list[str], metavar: str) -> None:
    """Metavars read `list of int` or `size`, not Python's `<list[str]>`, or `<str>` for every flag."""
    text = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "400"}).output
    text = text[text.index("─ Options "):]  # arguments show their name; typer types them itself
    assert "<list[" not in text and "<str>" not in text and "<float>" not in text
    assert f" {metavar} " in text


def test_no_settings_help_states_its_default_twice() -> None:
    """A doc that already says what the default is or does (`Default: F·{1/32, …}`, `None: never`)
    gets no `(default: None)` after it; every other setting still ends with its default."""
    helps = {f"{name} {param.opts[0]}": param.help for name, command in config_commands().items()
             for param in command.params if param.name != "config" and getattr(param, "help", None)}
    twice = {flag: text for flag, text in helps.items()
             if (stated := re.search(r" \((default: .*|required)\)$", text, re.S))
             and (re.search(r"(?i)\bdefaults?\b", text[:stated.start()])
                  or stated.group(1) == "default: None" and re.search(r"\bNone\b", text[:stated.start()]))}
    assert twice == {}, twice
    assert "Default: F·{1/32" in helps["kukla train --levels"] and "(default: None)" not in helps["kukla train --levels"]
    assert helps["kukla train --width"].endswith("(default: 16384)") and helps["kukla harvest output"].endswith("(required)")


def test_python_dash_m_kukla_prints_the_version() -> None:
    out = subprocess.run([sys.executable, "-m", "kukla", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"kukla {kukla.__version__}", out.stderr



_ROOT = Path(kukla.__file__).parents[1]  # the checkout under test: `python -c`/`-m` put the cwd first on sys.path

_HELP_RUNNER = """
import sys
from kukla.cli.app import app
if "torch" in sys.modules:
    sys.exit("torch loaded by: import kukla.cli.app")
for command in {commands!r}:
    try:
        app([*command, "--help"], prog_name="kukla")
    except SystemExit as exit:
        assert exit.code == 0, command
    if "torch" in sys.modules:
        sys.exit("torch loaded by: kukla " + " ".join(command))
"""


def test_python_dash_m_kukla_help_does_not_import_torch() -> None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "kukla", "--help"],
                         capture_output=True, text=True, cwd=_ROOT)
    assert out.returncode == 0 and "Usage" in out.stdout, out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "kukla.cli.app" in imported and "torch" not in imported


def test_every_commands_help_answers_without_importing_torch() -> None:
    """`--help` answers at once: torch (seconds to import) loads only when a stage runs."""
    code = _HELP_RUNNER.format(commands=_commands(app))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


@dataclass
class _Demo:
    width: int = 16
    """Number of latents."""
    k: list[float] = field(default_factory=lambda: [4.0])
    """Active latents per token; several values give a sweep."""
    name: str = "x"
    """A name."""

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ConfigError("width", "must be positive")


def test_field_docstrings_become_help() -> None:
    assert field_docs(_Demo) == {"width": "Number of latents.", "k": "Active latents per token; several values give a sweep.", "name": "A name."}
    demo_app = typer.Typer()
    seen: list[_Demo] = []
    demo_app.command("demo")(config_command(_Demo, seen.append))
    demo_app.command("other")(lambda: None)
    result = runner.invoke(demo_app, ["demo", "--help"])
    assert "Number of latents" in result.output and "--width" in result.output


def test_flags_override_config_file_which_overrides_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('width = 32\nname = "from-file"\n')
    demo_app = typer.Typer()
    seen: list[_Demo] = []
    demo_app.command("demo")(config_command(_Demo, seen.append))
    demo_app.command("other")(lambda: None)
    result = runner.invoke(demo_app, ["demo", "--config", str(toml), "--k", "32,64", "--k", "8"])
    assert result.exit_code == 0, result.output
    assert seen == [_Demo(width=32, k=[32.0, 64.0, 8.0], name="from-file")]
    assert load_config(_Demo, toml, width=8) == _Demo(width=8, name="from-file")


def test_bad_config_values_name_the_field(tmp_path: Path) -> None:
    demo_app = typer.Typer()
    demo_app.command("demo")(config_command(_Demo, lambda c: None))
    demo_app.command("other")(lambda: None)
    result = runner.invoke(demo_app, ["demo", "--width", "-3"])
    assert result.exit_code == 2
    assert "width: must be positive" in result.output and "Traceback" not in result.output
    try:
        from_dict(_Demo, {"widht": 3})
    except Exception as exc:  # noqa: BLE001 - the message is what we check
        assert "did you mean 'width'" in str(exc)
    else:
        raise AssertionError("unknown key accepted")


def test_sigterm_while_a_command_starts_stops_it_with_one_line(tmp_path: Path) -> None:
    """A command's first seconds (torch's import, a model's load) ran under Python's default
    SIGTERM: exit −15 and no line, where every later moment ends with `stopped:` and 143."""
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "toy.zarr"
    proc = subprocess.Popen([sys.executable, *stopping_at_read(r"/torch/__init__\.py$"), "harvest", str(out),
                             "--source", "toy-tree", "--tokens", "4096"], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
    deadline = time.monotonic() + 60
    while not stopped(proc):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "stopped: SIGTERM: committed work is kept; rerun the same command to resume"
    assert not out.exists()
