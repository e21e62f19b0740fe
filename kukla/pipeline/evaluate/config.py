"""The evaluate stage's one config: CLI flags, TOML `[evaluate]` and Python all fill it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kukla.config import DEFAULT_DEVICE, ModelDtype, resolve_device
from kukla.errors import ConfigError


@dataclass
class DownstreamConfig:
    """Splice each dictionary into the store's model for CE loss recovered, ΔLM loss and KL."""

    enabled: bool = True
    """Score the downstream metrics; off re-tokenizes no text and splices nothing."""
    require: bool = False
    """Fail instead of skipping with a note when the model or its text cannot be loaded."""
    contexts: int = 64
    """Context windows for the downstream metrics, re-tokenized from the store's dataset exactly
    as the harvest did (after the harvested windows where the dataset has more text); without the
    dataset, the store's own windows (harvested text, said in a note)."""
    batch_size: int = 8
    """Context windows per forward pass."""
    mean_ablation: bool = True
    """Report CE recovered and KL score against mean ablation (the held-out mean of the spliced hook)
    first, as `ce_loss_recovered`; zero ablation is always reported too, and flatters weak
    dictionaries (demo scale: 0.75 against zero ablation, −0.25 against the mean)."""

    def __post_init__(self) -> None:
        for name in ("contexts", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.require and not self.enabled:
            raise ConfigError("require", "contradicts --no-downstream (enabled = false)")


@dataclass
class AbsorptionConfig:
    """SAEBench's first-letter absorption on the model's vocabulary (residual-stream SAEs only):
    the probes' gates and search limits."""

    enabled: bool = True
    """Score absorption; off saves the word probes' forward passes and fits."""
    words: int = 4000
    """Single-token words sampled from the vocabulary for the probes (SAEBench uses every
    alphabetic token); a fifth are held out, so fewer words leave letters below the gate."""
    min_probe_f1: float = 0.6
    """Leave out letters whose logistic first-letter probe scores below this F1 (SAEBench's gate)."""
    min_positives: int = 20
    """Leave out letters with fewer probe-detected test tokens than this (SAEBench's gate)."""
    max_k: int = 10
    """Largest k tried by the k-sparse probes that find each letter's main latents."""
    f1_jump: float = 0.03
    """A latent joins a letter's main latents while adding it raises the k-sparse probe's F1 by this much."""
    l1: float = 0.01
    """L1 weight of the dense probe on the codes whose weights rank each letter's latents."""
    epochs: int = 100
    """Full-batch Adam steps of every logistic probe."""
    seed: int = 0
    """Seed of the word sample, the probes' train/test split and their initialisation."""

    def __post_init__(self) -> None:
        for name in ("words", "min_positives", "max_k", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.min_probe_f1 <= 1:
            raise ConfigError("min_probe_f1", "must be between 0 and 1")
        if self.l1 < 0 or self.f1_jump < 0:
            raise ConfigError("l1" if self.l1 < 0 else "f1_jump", "must not be negative")


@dataclass
class EvaluateConfig:
    """Score dictionaries on a store's held-out rows and write metrics.json, report.md, report.html."""

    dictionaries: list[Path]
    """Dictionary directories (ours or SAELens'), compared side by side."""
    store: str
    """The activation store whose held-out rows are the eval set (a path or fsspec URL)."""
    out: Path
    """Report directory to write (metrics.json, report.md, report.html, latents_<name>.parquet)."""
    max_tokens: int | None = None
    """Evaluate at most this many held-out rows (default: all of them)."""
    batch_size: int = 4096
    """Rows per batch through the dictionaries (results do not depend on it)."""
    device: str = DEFAULT_DEVICE
    """Torch device for dictionaries and the model: auto (a GPU if one is visible, else cpu), cpu, cuda, cuda:1, mps."""
    model: str | None = None
    """Model to load instead of the one the store's metadata names (name or local HF folder)."""
    model_dtype: ModelDtype = "float32"
    """dtype the model runs in for downstream metrics and absorption."""
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    """Downstream CE/KL: an [evaluate.downstream] table, or dotted keys (downstream.contexts = 16)."""
    absorption: AbsorptionConfig = field(default_factory=AbsorptionConfig)
    """First-letter absorption: an [evaluate.absorption] table, or dotted keys (absorption.words = 1000)."""
    top_examples: int = 8
    """Top-activating rows kept per latent in the per-latent table."""
    context_tokens: int = 12
    """Tokens of context (ending at the active token) shown for each top-activating row."""

    def __post_init__(self) -> None:
        self.store = str(self.store)  # a Path from Python names the same store; a URL must stay a string
        self.device = resolve_device(self.device)
        if not self.dictionaries:
            raise ConfigError("dictionaries", "give at least one dictionary directory")
        resolved = [Path(p).resolve() for p in self.dictionaries]
        twice = next((p for i, p in enumerate(self.dictionaries) if resolved[i] in resolved[:i]), None)
        if twice is not None:
            raise ConfigError("dictionaries", f"{twice} is given twice: give each dictionary once")
        for name in ("batch_size", "top_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.context_tokens < 0:
            raise ConfigError("context_tokens", "must not be negative")
