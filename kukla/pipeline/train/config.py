"""`TrainConfig`: every setting of `kukla train`, for the CLI, TOML files and Python alike.

A run trains a sweep: every combination of `width` × `k` × `seed` is one dictionary,
all fed from one stream of the store (each batch is read once). The settings that shape
each dictionary (architecture, levels, aux-k, …) are inherited from `DictionarySettings`
and reach every member's `DictionaryConfig` unchanged, so they are defined and checked
once, there; this file adds the sweep axes and everything about the training run.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kukla.config import DEFAULT_DEVICE
from kukla.errors import ConfigError
from kukla.pipeline.dictionary.config import DEAD_TOKENS_MAX, DictionaryConfig, DictionarySettings
from kukla.pipeline.hooks import expand_hook

Decay = Literal["linear", "cosine", "constant"]


@dataclass(frozen=True)
class Member:
    """One dictionary of a sweep: its name (its directory under --out) and its config."""

    name: str
    seed: int
    config: DictionaryConfig


@dataclass
class WandbConfig:
    """Logging the run's metric lines to Weights & Biases (rank 0 only)."""

    enabled: bool = False
    """Log to W&B (respects WANDB_MODE=offline): one W&B run per training run, each sweep member's
    figures under its name (`batchtopk-w4096-k32-s0/fvu`); a rerun into the same --out (--resume, or one
    killed before its first checkpoint started again with the same settings) continues the W&B run named in
    out/wandb_run.json."""
    project: str = "kukla"
    """W&B project."""
    name: str | None = None
    """W&B run name; default: the output directory's name."""


@dataclass(kw_only=True)
class TrainConfig(DictionarySettings):
    """Every setting of `kukla train`: the store and hooks, the sweep axes (width × k × seed),
    the dictionary settings every member shares (inherited), and the run itself."""

    store: str
    """Finalized activation store to train on (a path or fsspec URL)."""
    out: Path
    """Output directory: one dictionary directory per sweep member, checkpoints, metrics.jsonl."""
    hook: str | None = None
    """Hook to train an SAE on (reconstructs its own input), a full name or a short form (resid_post:6). Give this, or --input-hook and --target-hook."""
    input_hook: str | None = None
    """Transcoder input hook (e.g. blocks.3.ln2.hook_normalized, or a short form such as mlp_in:3)."""
    target_hook: str | None = None
    """Transcoder target hook (e.g. blocks.3.hook_mlp_out or mlp_out:3); Matryoshka levels apply to its reconstruction."""
    width: list[int] = field(default_factory=lambda: [16384])
    """Number of latents; several values (4096,8192) sweep them."""
    k: list[float] = field(default_factory=lambda: [64.0])
    """Active latents per token (a per-token average for BatchTopK, so it may be fractional); several values sweep them. Ignored by relu and jumprelu."""
    seed: list[int] = field(default_factory=lambda: [0])
    """Initialisation seeds; several values sweep them. The first also seeds the data order (see data_seed)."""
    data_seed: int | None = None
    """Seed of the data order (default: the first seed), shared by every member: --seed 1 --data-seed 0 trains alone the s1 member of a --seed 0,1 sweep."""
    tokens: int = 100_000_000
    """Training tokens (summed over ranks); more than the store holds runs several epochs."""
    batch_size: int = 4096
    """Global batch in tokens (split evenly across ranks)."""
    lr: float | None = None
    """Adam learning rate; default 2e-4·√(2¹⁴/width), per width."""
    warmup: float = 0.01
    """Fraction of the steps over which the learning rate rises linearly from 0."""
    decay: Decay = "linear"
    """Learning-rate decay to 0 after decay_start."""
    decay_start: float = 0.8
    """Fraction of the steps after which the learning rate decays."""
    grad_clip: float = 1.0
    """Clip each dictionary's gradient norm to this (0: no clipping)."""
    init_tokens: int = 16384
    """Training rows used to initialise (b_dec = their geometric median)."""
    calibration_tokens: int = 262144
    """Rows used to calibrate the BatchTopK inference threshold, from the start of the store's
    calibration split (the first half of its held-out rows, at most 2¹⁸), which evaluate never scores."""
    per_latent_thresholds: bool = False
    """BatchTopK inference: give each latent its own threshold (it fires as often as BatchTopK chose
    it on the calibration rows) instead of one threshold for all; SAELens' JumpReLU loads either."""
    l0_cap: float = 4.0
    """BatchTopK inference: keep at most ceil(l0_cap·k) latents per token (0: no cap), so a
    massive-activation token cannot fire a thousand latents. 4 measured best on Gemma-3-270m
    held-out text (benchmarks/RESULTS.md: higher EV, and a Matryoshka's full width no longer
    loses to its prefix; 2 clips ordinary tokens). SAELens' JumpReLU has no cap."""
    massive: Literal["keep", "skip"] = "keep"
    """Rows the store flags as massive activations (`tokens/massive`): keep trains on them like any
    row; skip leaves them out of every batch (they hold a large share of the variance on a few tokens)."""
    checkpoint_every: int = 2000
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk."""
    resume: bool = False
    """Continue the run in --out from its latest checkpoint (starts fresh if there is none); --out
    and the store may be reached by other paths than the first time (a copy, another mount)."""
    log_every: int = 50
    """Steps between metric lines (metrics.jsonl, progress bar, W&B)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging: a [train.wandb] table, or dotted keys (wandb.enabled = true)."""
    device: str = DEFAULT_DEVICE
    """Torch device: auto (a GPU if one is visible, else cpu), cpu, cuda, cuda:N; under torchrun, cuda means cuda:LOCAL_RANK."""
    compile: bool = False
    """torch.compile each dictionary's training loss (GPU; slow to start)."""
    threads: int | None = None
    """CPU threads for torch; default cores−1 (at least 1): on small machines torch's default stalls."""
    prefetch: int = 4
    """Batches the stream decodes ahead."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.store = str(self.store)  # a Path from Python names the same store; a URL must stay a string
        for name in ("hook", "input_hook", "target_hook"):  # short forms become the store's full names here, once
            if getattr(self, name) is not None:
                setattr(self, name, expand_hook(getattr(self, name)))
        if self.hook is not None and (self.input_hook is not None or self.target_hook is not None):
            raise ConfigError("hook", "give --hook (an SAE) or --input-hook with --target-hook (a transcoder), not both")
        if self.hook is None and (self.input_hook is None or self.target_hook is None):
            raise ConfigError("hook", "is required (or --input-hook and --target-hook for a transcoder)")
        if self.input_hook is not None and self.input_hook == self.target_hook:
            raise ConfigError("target_hook", f"is the input hook {self.input_hook}: a dictionary that rebuilds its own "
                                             "input is an SAE, so give --hook instead (or another --target-hook)")
        for name in ("width", "k", "seed"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(name, "needs at least one value")
            if len(set(values)) != len(values):
                raise ConfigError(name, f"lists a value twice: {values}")
        if not self.rule.needs_k and len(self.k) > 1:
            raise ConfigError("k", f"{self.activation} dictionaries have no k (their sparsity comes from their "
                                   "penalty): give one value")
        self.members(d_in=1, d_out=1)  # each member's DictionaryConfig checks k, levels, widths now
        positive = {"tokens": self.tokens, "batch_size": self.batch_size, "init_tokens": self.init_tokens,
                    "calibration_tokens": self.calibration_tokens, "log_every": self.log_every,
                    "keep_checkpoints": self.keep_checkpoints, "prefetch": self.prefetch}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(name, "must be positive")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError("lr", "must be positive")
        for name in ("warmup", "decay_start"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, "must be a fraction between 0 and 1")
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every", "must be 0 (only at the end) or a number of steps")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip", "must be 0 (off) or positive")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError("threads", "must be positive")
        if self.l0_cap < 0 or 0 < self.l0_cap < 1:
            raise ConfigError("l0_cap", f"must be 0 (no cap) or at least 1 (a multiple of k), got {self.l0_cap}")

    @property
    def hooks(self) -> tuple[str, ...]:
        """Hooks the stream reads: (hook,) for an SAE, (input, target) for a transcoder."""
        return (self.hook,) if self.hook is not None else (self.input_hook, self.target_hook)  # type: ignore[return-value]

    def members(self, d_in: int, d_out: int) -> list[Member]:
        """Every width × k × seed combination, in a fixed order (the checkpoint relies on it)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(DictionarySettings)}
        shared["dead_tokens"] = self.dead_window
        out = []
        for width, k, seed in itertools.product(self.width, self.k, self.seed):
            cfg = DictionaryConfig(**shared, d_in=d_in, d_out=d_out, width=width,
                                   k=k if self.rule.needs_k else None, transcoder=self.hook is None)
            name = f"{self.arch or self.label}-w{width}" + (f"-k{k:g}" if self.rule.needs_k else "") + f"-s{seed}"
            out.append(Member(name=name, seed=seed, config=cfg))
        return out

    @property
    def dead_window(self) -> int:
        """dead_tokens, or by default a tenth of the run's tokens (at most 10M)."""
        return self.dead_tokens or max(1, min(DEAD_TOKENS_MAX, self.tokens // 10))

    def l0_cap_for(self, member: DictionaryConfig) -> int:
        """A BatchTopK member's per-token inference cap in latents (0: none)."""
        return math.ceil(self.l0_cap * float(member.k or 0)) if self.l0_cap else 0

    def threads_default(self) -> int:
        """Threads to use on CPU: measured on 2 shared cores, 1 thread beat 2 by 1.4–17×."""
        return self.threads or max(1, (os.cpu_count() or 2) - 1)

    def total_steps(self, world: int) -> int:
        """Optimiser steps in the run (each consumes one global batch)."""
        return math.ceil(self.tokens / self.local_batch(world) / world)

    def local_batch(self, world: int) -> int:
        """Rows each rank reads per step."""
        if self.batch_size % world:
            raise ConfigError("batch_size", f"{self.batch_size} does not split evenly over {world} ranks: give a "
                                            f"multiple of {world}, such as {-(-self.batch_size // world) * world}")
        return self.batch_size // world


def learning_rate(config: TrainConfig, base: float, step: int, total: int) -> float:
    """Linear warmup from 0, constant, then decay to 0 over the last (1 − decay_start) of the steps."""
    warm = config.warmup * total
    if warm > 0 and step < warm:
        return base * (step + 1) / warm
    start = config.decay_start * total
    if config.decay == "constant" or step < start or total <= start:
        return base
    progress = min(1.0, (step - start) / (total - start))
    if config.decay == "linear":
        return base * (1 - progress)
    return base * 0.5 * (1 + math.cos(math.pi * progress))
