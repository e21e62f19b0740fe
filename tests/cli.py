"""The kukla CLI run in-process, and the one-line error every failed command must end in."""

from __future__ import annotations

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
