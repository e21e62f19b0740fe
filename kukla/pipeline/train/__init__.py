"""Training: a finalized store → a sweep of dictionaries (SAEs or transcoders), optionally over DDP ranks.

`TrainConfig` is light to import (the CLI builds its flags from it); `train` loads the
trainer on first use.
"""

from typing import Any

from kukla.pipeline.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from kukla.pipeline.train.api import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
