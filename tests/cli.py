"""The kukla CLI run in-process, its commands built from a config, and the one-line error every
failed command must end in."""

from __future__ import annotations

import click
import typer.main
from typer.testing import CliRunner

from kukla.cli.app import app

runner = CliRunner()


def kukla(*args: object) -> tuple[int, str]:
    """Exit code and stdout + stderr (progress bars and log lines go to stderr)."""
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def one_line_error(code: int, output: str, *needles: str) -> str:
    """The failed command's one `error:` line (exit 2, no traceback), holding each of `needles`."""
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in output, output
    for needle in needles:
        assert needle in errors[0], output
    return errors[0]


def config_commands() -> dict[str, click.Command]:
    """Every command of the real CLI that is built from a config dataclass, by its full name."""
    found: dict[str, click.Command] = {}

    def walk(command: click.Command, name: str) -> None:
        for sub_name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{name} {sub_name}")
        if getattr(command.callback, "config_class", None) is not None:
            found[name] = command

    walk(typer.main.get_command(app), "kukla")
    return found
