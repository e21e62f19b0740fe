"""Evaluate dictionaries on a store's held-out rows: reconstruction, sparsity, downstream CE/KL,
absorption, toy ground truth; writes metrics.json, report.md, report.html and per-latent tables."""

from kukla.pipeline.evaluate.config import EvaluateConfig
from kukla.pipeline.evaluate.run import evaluate

__all__ = ["EvaluateConfig", "evaluate"]
