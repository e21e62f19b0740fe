"""The `kukla` Typer application: one sub-command per stage, registered by its module."""

from __future__ import annotations

from typing import Optional

import typer

import kukla

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
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """kukla: harvest → train → evaluate sparse dictionaries."""


def main() -> None:
    app()
