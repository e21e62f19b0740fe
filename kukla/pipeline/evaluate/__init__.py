"""Evaluate dictionaries on a store's held-out rows: reconstruction, sparsity, downstream CE/KL,
absorption, toy ground truth; writes metrics.json, report.md, report.html and per-latent tables.

`EvaluateConfig` is light to import (the CLI builds its flags from it); `evaluate` loads on first use.
"""

from kukla import lazy_exports
from kukla.pipeline.evaluate.config import AbsorptionConfig, DownstreamConfig, EvaluateConfig

__all__ = ["AbsorptionConfig", "DownstreamConfig", "EvaluateConfig", "evaluate"]
__getattr__ = lazy_exports(__name__, {"evaluate": "kukla.pipeline.evaluate.run"})
