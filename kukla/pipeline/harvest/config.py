"""The harvest stage's one config: CLI flags, TOML `[harvest]` and Python all fill it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from kukla.config import DEFAULT_DEVICE, DEFAULT_MEMORY_BUDGET, Bytes, ModelDtype, StoreDtype, resolve_device
from kukla.errors import ConfigError
from kukla.pipeline.massive import MASSIVE_RATIO


@dataclass
class ToyConfig:
    """The toy source: features in a tree (children fire only with their parent) along random
    unit directions, each row their sum plus Gaussian noise; the truth is stored beside the rows."""

    tree: list[int] = field(default_factory=lambda: [32, 4])
    """Branching per level, roots first (32,4 = 32 parents with 4 children each)."""
    p_root: float = 0.05
    """Probability that a root feature fires on a row."""
    p_child: float = 0.25
    """Probability that a child fires on a row where its parent fires."""
    dim: int = 256
    """Dimension of the rows."""
    noise: float = 0.01
    """Standard deviation of the Gaussian noise added to every coordinate."""
    magnitude_std: float = 0.1
    """Spread of feature magnitudes around 1 (magnitude = |1 + std·N(0,1)|)."""

    def __post_init__(self) -> None:
        if not self.tree or any(b <= 0 for b in self.tree):
            raise ConfigError("tree", "give positive branching factors, roots first, e.g. 32,4")
        if self.dim <= 0:
            raise ConfigError("dim", "must be positive")
        for name in ("p_root", "p_child"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, "must be a probability in [0, 1]")
        for name in ("noise", "magnitude_std"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be ≥ 0")


@dataclass
class DatasetConfig:
    """The text a model harvest reads, as the store's metadata records it (`dataset` there)."""

    name: str | None = None
    """HF dataset name (streamed) or a local .txt/.jsonl/.json/.parquet file; `--dataset X` or `dataset = "X"`."""
    subset: str | None = None
    """HF dataset configuration name (e.g. wikitext-103-raw-v1); none for local files."""
    split: str = "train"
    """Dataset split to read."""
    revision: str | None = None
    """Dataset revision (git ref on the Hub) so a rerun reads the same text."""
    text_column: str = "text"
    """Column holding the text."""


@dataclass
class HarvestConfig:
    """Run a model (or the toy source) over text and write a finalized activation store."""

    output: str
    """Store to write (a folder, or an fsspec URL such as s3://bucket/run.zarr)."""
    source: Literal["model", "toy-tree"] = "model"
    """Where rows come from: a transformer over a text dataset, or the hierarchical toy generator."""
    model: str = "google/gemma-3-270m"
    """TransformerLens name (needs the Hub), local HF folder, or the embedded google/gemma-3-270m."""
    hook: list[str] = field(default_factory=list)
    """Hook points, repeatable: TransformerLens names or short forms like resid_post:6, mlp_out:6."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """The text (source = model): `dataset = "X"` names it (a plain string in Python too); a
    [harvest.dataset] table adds its subset, split, revision and text column."""
    context_size: int = 128
    """Tokens per window, the BOS included; at most the model's n_ctx."""
    tokens: int = 1_000_000
    """Tokens to store: windows are planned until this many storable tokens (rows) are covered."""
    batch_size: int = 16
    """Windows per forward pass."""
    segment_windows: int = 64
    """Windows per committed segment: the unit of resume and of the rank split."""
    keep_special_tokens: bool = False
    """Store BOS/EOS/pad and other special-token positions too (else they are left out)."""
    outlier_factor: float | None = None
    """Drop tokens whose norm at any hook exceeds this many times that hook's median norm."""
    massive_ratio: float | None = MASSIVE_RATIO
    """Flag rows (tokens/massive = 1) whose norm at any hook exceeds this many times that hook's
    median norm over the plan's first segment; none writes no flags."""
    device: str = DEFAULT_DEVICE
    """Torch device for the model: auto (a GPU if one is visible, else cpu), cpu, cuda, cuda:1, mps; under torchrun, cuda means cuda:LOCAL_RANK."""
    model_dtype: ModelDtype = "float32"
    """Dtype the model runs in."""
    store_dtype: StoreDtype = "bfloat16"
    """Dtype of the stored activations (float16 refuses values that overflow)."""
    rank: int | None = None
    """This process's rank; defaults to torchrun's RANK, else 0."""
    world: int | None = None
    """Number of harvest processes; defaults to torchrun's WORLD_SIZE, else 1."""
    finalize: bool = True
    """On rank 0, wait for every rank's part, then shuffle and merge them into the final store."""
    finalize_wait: float = 86_400.0
    """Seconds rank 0 waits for the other ranks before leaving finalize to `kukla store finalize`."""
    memory_budget: Bytes = DEFAULT_MEMORY_BUDGET
    """Memory the global shuffle may use (e.g. 512MiB, 8GB, or a byte count); pass 2 reads ~32·(store ÷ budget)² pieces, so a multi-TB store wants ~1% of its size."""
    holdout_rows: int | None = None
    """Rows at the end of the shuffled store kept out of training, for evaluation and threshold
    calibration; default min(1% of rows, 2²⁰)."""
    seed: int = 0
    """Seed of the global shuffle (and of the toy source)."""
    overwrite: bool = False
    """Replace a store of another run at the output path."""
    toy: ToyConfig = field(default_factory=ToyConfig)
    """The hierarchical toy generator (source = toy-tree): a [harvest.toy] table, or dotted keys (toy.dim = 64)."""

    RENAMED: ClassVar[dict[str, str]] = {"dtype": "model_dtype"}
    """Old keys whose new name no plain "did you mean" finds (dtype was the model's, not the store's)."""

    def __post_init__(self) -> None:
        if isinstance(self.dataset, str):  # the Python API's shorthand, as `dataset = "X"` in TOML
            self.dataset = DatasetConfig(self.dataset)
        positive = {"context_size": self.context_size, "tokens": self.tokens, "batch_size": self.batch_size,
                    "segment_windows": self.segment_windows}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(name, "must be positive")
        if self.context_size < 2:
            raise ConfigError("context_size", "must be at least 2 (the BOS and one token)")
        if self.source == "model":
            if not self.hook:
                raise ConfigError("hook", "give at least one hook, e.g. --hook resid_post:6")
            if not self.dataset.name:
                raise ConfigError("dataset", "give a dataset: an HF name or a local .txt/.jsonl/.parquet file")
        if self.outlier_factor is not None and self.outlier_factor <= 1:
            raise ConfigError("outlier_factor", "must be above 1 (a multiple of the median norm)")
        if self.massive_ratio is not None and self.massive_ratio <= 1:
            raise ConfigError("massive_ratio", "must be above 1 (a multiple of the median norm)")
        if self.rank is None:
            self.rank = int(os.environ.get("RANK", 0))
        if self.world is None:
            self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.device = resolve_device(self.device)
        if self.world < 1:
            raise ConfigError("world", "must be at least 1")
        if not 0 <= self.rank < self.world:
            raise ConfigError("rank", f"must be in 0..{self.world - 1} (world is {self.world})")
        if self.memory_budget <= 0:
            raise ConfigError("memory_budget", "must be positive")
        if self.holdout_rows is not None and not 0 <= self.holdout_rows < self.tokens:
            raise ConfigError("holdout_rows", f"must be at least 0 and below tokens ({self.tokens}), so rows are "
                                              f"left to train on; got {self.holdout_rows}")
