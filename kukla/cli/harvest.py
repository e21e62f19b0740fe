"""`kukla harvest`: the CLI face of `kukla.pipeline.harvest.harvest`."""

from __future__ import annotations

import typer

from kukla.cli.options import config_command
from kukla.pipeline.harvest.config import HarvestConfig


def _harvest(config: HarvestConfig) -> None:
    """Run a model (or --source toy-tree) over a dataset and write a shuffled, finalized store.

    Rerun the same command after a crash to resume; run one process per rank
    (torchrun or --rank/--world) to split the work.
    """
    from kukla.pipeline.harvest.run import harvest

    out = harvest(config)
    typer.echo(f"store: {out}")


harvest_command = config_command(HarvestConfig, _harvest, arguments=("output",), section="harvest")
