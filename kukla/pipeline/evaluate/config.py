"""The evaluate stage's one config: CLI flags, TOML `[evaluate]` and Python all fill it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kukla.config import DEFAULT_DEVICE, resolve_device
from kukla.errors import ConfigError


@dataclass
class EvaluateConfig:
    """Score dictionaries on a store's held-out rows and write metrics.json, report.md, report.html."""

    dictionaries: list[Path]
    """Dictionary directories (ours or SAELens'), compared side by side."""
    store: Path
    """The activation store whose held-out rows are the eval set."""
    out: Path
    """Report directory to write (metrics.json, report.md, report.html, latents_<name>.parquet)."""
    max_tokens: int | None = None
    """Evaluate at most this many held-out rows (default: all of them)."""
    batch_size: int = 4096
    """Rows per batch through the dictionaries (results do not depend on it)."""
    device: str = DEFAULT_DEVICE
    """Torch device for dictionaries and the model: auto (a GPU if one is visible, else cpu), cpu, cuda, cuda:1, mps."""
    downstream: bool = True
    """Splice each dictionary into the store's model for CE loss recovered, ΔLM loss and KL."""
    require_downstream: bool = False
    """Fail instead of skipping with a note when the model or its text cannot be loaded."""
    model: str | None = None
    """Model to load instead of the one the store's metadata names (name or local HF folder)."""
    model_dtype: str = "float32"
    """dtype the model runs in for downstream metrics and absorption."""
    downstream_contexts: int = 64
    """Context windows for the downstream metrics, re-tokenized from the store's dataset exactly
    as the harvest did (after the harvested windows where the dataset has more text); without the
    dataset, the store's own windows (harvested text, said in a note)."""
    downstream_batch_size: int = 8
    """Context windows per forward pass."""
    mean_ablation: bool = True
    """Report CE recovered and KL score against mean ablation (the held-out mean of the spliced hook)
    first, as `ce_loss_recovered`; zero ablation is always reported too, and flatters weak
    dictionaries (demo scale: 0.75 against zero ablation, −0.25 against the mean)."""
    absorption: bool = True
    """SAEBench's first-letter absorption on the model's vocabulary (residual-stream SAEs only)."""
    absorption_words: int = 4000
    """Single-token words sampled from the vocabulary for the absorption probes (SAEBench uses
    every alphabetic token); a fifth are held out, so fewer words leave letters below the gate."""
    absorption_min_probe_f1: float = 0.6
    """Leave out letters whose logistic first-letter probe scores below this F1 (SAEBench's gate)."""
    absorption_min_positives: int = 20
    """Leave out letters with fewer probe-detected test tokens than this (SAEBench's gate)."""
    absorption_max_k: int = 10
    """Largest k tried by the k-sparse probes that find each letter's main latents."""
    absorption_f1_jump: float = 0.03
    """A latent joins a letter's main latents while adding it raises the k-sparse probe's F1 by this much."""
    top_examples: int = 8
    """Top-activating rows kept per latent in the per-latent table."""
    context_tokens: int = 12
    """Tokens of context (ending at the active token) shown for each top-activating row."""
    seed: int = 0
    """Seed for the absorption probes' train/test split and initialisation."""

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        if not self.dictionaries:
            raise ConfigError("dictionaries", "give at least one dictionary directory")
        for name in ("batch_size", "downstream_contexts", "downstream_batch_size", "top_examples",
                     "absorption_max_k", "absorption_min_positives", "absorption_words"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.context_tokens < 0:
            raise ConfigError("context_tokens", "must not be negative")
        if not 0 <= self.absorption_min_probe_f1 <= 1:
            raise ConfigError("absorption_min_probe_f1", "must be between 0 and 1")
        if self.require_downstream and not self.downstream:
            raise ConfigError("require_downstream", "contradicts --no-downstream")
