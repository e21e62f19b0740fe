"""The `kukla` Typer application: one sub-command per stage, registered by its module."""

from __future__ import annotations

from typing import Optional

import typer

import kukla
from kukla.cli.options import friendly
from kukla.progress import LOG_LEVEL_ENV, show_logs

app = typer.Typer(
    name="kukla",
    help="Harvest transformer activations, train Matryoshka SAEs and transcoders, evaluate them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kukla {kukla.__version__}")
        raise typer.Exit()


@app.callback()
@friendly
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help=f"Log only warnings and errors (else the level is ${LOG_LEVEL_ENV}, or info)."
    ),
) -> None:
    """kukla: harvest → train → evaluate sparse dictionaries."""
    show_logs("warning" if quiet else None)


from kukla.cli.harvest import harvest_command  # noqa: E402 - registered after the app exists
app.command("harvest")(harvest_command)
from kukla.cli.train import command as train_command  # noqa: E402
app.command("train")(train_command)
from kukla.cli.evaluate import command as evaluate_command  # noqa: E402
app.command("evaluate")(evaluate_command)

from kukla.cli.run import demo_command, run_command  # noqa: E402
app.command("run")(run_command)
app.command("demo")(demo_command)
from kukla.cli.store import store_app  # noqa: E402
app.add_typer(store_app, name="store")


def main() -> None:
    app()
