"""`train(config) -> list[Path]`: the Python entry point, and what `kukla train` calls."""

from __future__ import annotations

from pathlib import Path

import torch

from kukla.errors import KuklaError
from kukla.pipeline.train import loop
from kukla.pipeline.train.config import TrainConfig
from kukla.pipeline.train.distributed import close_ranks, init_ranks
from kukla.pipeline.train.sweep import oom_hint


def train(config: TrainConfig) -> list[Path]:
    """Train every dictionary of `config`'s sweep; returns their directories under `config.out`.

    Under torchrun, every rank calls this; rank 0 writes the outputs, and every rank
    returns the same paths.
    """
    ranks = init_ranks(config.device)
    if ranks.device.type == "cpu" or config.threads is not None:
        torch.set_num_threads(config.threads_default())
    try:
        return loop.run(config, ranks)
    except torch.cuda.OutOfMemoryError:
        raise KuklaError(oom_hint(config, len(config.width) * len(config.k) * len(config.seed))) from None
    except RuntimeError as exc:  # the CPU allocator reports running out this way
        if "can't allocate memory" in str(exc) or "not enough memory" in str(exc):
            raise KuklaError(oom_hint(config, len(config.width) * len(config.k) * len(config.seed))) from None
        raise
    finally:
        close_ranks(ranks)
