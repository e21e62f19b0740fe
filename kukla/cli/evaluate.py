"""`kukla evaluate DICT_DIR [DICT_DIR …] --store STORE --out REPORT_DIR`."""

from __future__ import annotations

import typer

from kukla.cli.options import config_command
from kukla.pipeline.evaluate.config import EvaluateConfig


def run(config: EvaluateConfig) -> None:
    """Score dictionaries side by side on a store's held-out rows: EV/FVU, L0, dead/dense latents,
    Matryoshka levels, CE loss recovered and KL (the store's model), first-letter absorption,
    toy ground truth. Writes metrics.json, report.md, report.html and latents_<name>.parquet.
    """
    from kukla.pipeline.evaluate import evaluate  # torch and the model load only when a run starts
    out = evaluate(config)
    typer.echo(f"report: {out / 'report.html'}")


command = config_command(EvaluateConfig, run, arguments=("dictionaries",), section="evaluate")
