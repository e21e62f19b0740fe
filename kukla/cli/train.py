"""`kukla train STORE --hook H --arch A --width F --k K --tokens N --out DIR` (also under torchrun)."""

from __future__ import annotations

import os

import typer

from kukla.cli.options import config_command
from kukla.pipeline.train.config import TrainConfig
from kukla.progress import show_logs


def run(config: TrainConfig) -> None:
    """Train Matryoshka SAEs or transcoders from a finalized store: every width × k × seed from one stream.

    Launch with `torchrun --nproc_per_node N -m kukla train …` for DDP. Prints the
    dictionary directories (each loads with sae_lens.SAE.load_from_disk).
    """
    from kukla.pipeline.train import train  # torch and the store load only when a run starts

    paths = train(config)
    if os.environ.get("RANK", "0") == "0":
        for path in paths:
            typer.echo(path)


command = config_command(TrainConfig, run, arguments=("store",), section="train")


if __name__ == "__main__":  # `python -m kukla.cli.train …`: this command alone, without the other stages' imports
    show_logs()  # the app's callback, which does this for `kukla train`, is not run here
    typer.run(command)
