"""Training: a finalized store → a sweep of dictionaries (SAEs or transcoders), optionally over DDP ranks.

`TrainConfig` is light to import (the CLI builds its flags from it); `train` loads the
trainer on first use.
"""

from kukla import lazy_exports
from kukla.pipeline.train.config import TrainConfig, WandbConfig

__all__ = ["TrainConfig", "WandbConfig", "train"]
__getattr__ = lazy_exports(__name__, {"train": "kukla.pipeline.train.loop"})
