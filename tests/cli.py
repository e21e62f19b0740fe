"""The kukla CLI run in-process, its commands built from a config, and the one-line error every
failed command must end in."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

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


_STOP_AT_READ = textwrap.dedent("""
    import os, re, runpy, signal, sys
    pattern, stopped = re.compile(sys.argv[1]), []
    def stop(event, args):
        reading = event == "open" and isinstance(args[0], (str, os.PathLike)) and args[1] in ("r", "rb")
        if reading and not stopped and pattern.search(os.fspath(args[0])):
            stopped.append(args[0])
            os.kill(os.getpid(), signal.SIGSTOP)
    sys.addaudithook(stop)
    sys.argv = ["kukla", *sys.argv[2:]]
    runpy.run_module("kukla", run_name="__main__")
""")


def stopping_at_read(pattern: str) -> list[str]:
    """Python's arguments for `python -m kukla ARGS` (append ARGS) that SIGSTOPs itself just before
    it first opens a file matching `pattern` for reading: a stop at an exact point of kukla's own
    work, which runs unchanged."""
    return ["-c", _STOP_AT_READ, pattern]


def stopped(proc: subprocess.Popen) -> bool:
    """Whether the process is stopped (SIGSTOP), as `stopping_at_read` leaves it."""
    return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
