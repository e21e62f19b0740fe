"""One dictionary's configuration: activation rule × prefix scheme × input/target pairing.

Three independent choices: `activation` (a rule in `rules/`), `prefixes` (the Matryoshka
scheme) and the pairing (`transcoder`, implied by the hooks), so a new combination is a config
value, not a new class. `arch` names are shorthands that fill `activation` and `prefixes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kukla.errors import ConfigError

if TYPE_CHECKING:
    from kukla.pipeline.dictionary.rules import Rule

Arch = Literal["topk", "batchtopk", "relu", "jumprelu", "matryoshka-batchtopk", "matryoshka-prefix"]
ActivationRule = Literal["batchtopk", "topk", "relu", "jumprelu"]
PrefixScheme = Literal["none", "levels", "sampled", "all"]


def default_lr(width: int) -> float:
    """Adam learning rate that scales as 1/√F: 2e-4 at F = 2¹⁴ (docs/ARCHITECTURE.md)."""
    return 2e-4 * (width / 2**14) ** -0.5


DEAD_TOKENS_MAX = 10_000_000
"""The default dead-latent window of a long run (OpenAI's); shorter runs use a tenth of their tokens."""

#: Matryoshka levels when none are given: F·{1/32, 3/32, 7/32, 15/32, 1} (Bussmann et al.).
DEFAULT_LEVEL_FRACTIONS = (1 / 32, 3 / 32, 7 / 32, 15 / 32, 1.0)


@dataclass(kw_only=True)
class DictionarySettings:
    """How a dictionary is built and trained, apart from its size (d_in, width, k).

    A sweep shares these between its members, so the trainer's config inherits them and
    every dictionary's config is these plus its own size: one definition, one validation.
    """

    activation: Literal["auto", ActivationRule] = "auto"
    """How codes are chosen: batchtopk (k·B per batch; JumpReLU at a calibrated threshold at
    inference), topk (k per token), relu (L1 or log penalty), jumprelu (a learned threshold per
    latent and an L0 penalty, Gemma Scope's recipe). auto: the one `arch` names, else batchtopk."""
    prefixes: Literal["auto", PrefixScheme] = "auto"
    """Matryoshka prefix scheme: none (one reconstruction), levels (fixed nested `levels`),
    sampled (n_prefixes lengths drawn per batch, Nabeshima), all (every prefix at once, block size
    1, each weighted by its expected share of those draws: the sampled loss's expectation).
    auto: the one `arch` sets, else levels."""
    arch: Arch | None = None
    """Shorthand that sets activation and prefixes: topk, batchtopk, relu, jumprelu (prefixes
    none, or levels when levels are given), matryoshka-batchtopk (batchtopk + levels),
    matryoshka-prefix (keeps activation; prefixes sampled unless all)."""
    levels: list[float] | None = None
    """Cumulative Matryoshka level widths ending at the width (e.g. 128,512,2048,8192,32768), or
    the same as fractions of the width (0.03125,0.125,…,1; fractions suit a width sweep), for
    prefixes = levels. Default: F·{1/32, 3/32, 7/32, 15/32, 1}. Stored as integer widths."""
    n_prefixes: int = 9
    """prefixes sampled (and all): distinct prefix lengths drawn per batch with P(l) ∝ √l − √(l−1) from
    1..F−1 (without replacement), plus the full width, which is always included."""
    level_weights: list[float] | None = None
    """Weight of each level's reconstruction term (fixed levels only), in level order. Default:
    1/G each (the mean), so the loss has the scale of one FVU whatever G is and aux_coefficient
    and l1_coefficient mean the same for every prefix scheme. SAELens' plain sum is all 1s.
    Sampled prefixes always use the mean over the n_prefixes + 1 draws (a Monte Carlo estimate of
    the expected prefix loss)."""
    spread_levels: bool = False
    """Fixed levels: spread each level's weight evenly over the prefix lengths inside it, so the
    cumulative weight C(l) runs linearly between the same level points instead of in steps, and
    train every prefix at once (the all-prefix closed form). With steps, every latent of a level is
    in the same prefixes, so nothing orders a parent before its children inside a level and a
    parent+child mixture latent stays put (issue 11 §0); use it with reorder_latents."""
    l1_coefficient: float = 0.3
    """relu: weight of the L1 penalty Σᵢ zᵢ‖W_dec,i‖, measured in units of the target's RMS
    deviation norm so it does not depend on the activations' scale."""
    penalty: Literal["l1", "log"] = "l1"
    """relu: sparsity penalty per latent, on a = zᵢ‖W_dec,i‖/σ (σ the target's RMS deviation norm):
    l1 = a; log = log(1 + a/ε) (Nabeshima's log(a + ε), shifted so a silent latent costs 0). With
    prefixes, each latent's penalty is weighted by the prefix weight that includes it (tail mass)."""
    log_epsilon: float = 0.1
    """ε of the log penalty, in the same σ units."""
    l0_coefficient: float = 1e-3
    """jumprelu: weight λ of the L0 penalty Σᵢ H(preᵢ − θᵢ) (latents per token) beside the FVU."""
    bandwidth: float = 1e-3
    """jumprelu: width ε of the rectangle kernel of the threshold's straight-through gradient,
    on the normalised scale of the pre-activations (E‖x‖ = √d)."""
    threshold_init: float = 1e-3
    """jumprelu: every latent's threshold θ at the start (θ = exp(log_threshold) is learned)."""
    target_l0: float | None = None
    """relu, jumprelu: adjust the penalty's weight after every step so the training L0 approaches
    this (starting from l1_coefficient, or l0_coefficient); None keeps the weight fixed."""
    l0_control_rate: float = 0.02
    """Step of the target-L0 controller: λ ← λ·exp(rate·(L0 − target)/max(L0, target)) per step."""
    reorder_latents: bool = False
    """After every step, sort latents by their running mean contribution zᵢ²‖W_dec,i‖² (largest
    first), permuting the weights, the Adam moments and the per-latent buffers together (Nabeshima)."""
    snap_fraction: float | None = None
    """Snap loss (Chanin et al.): from this fraction of training on, the reconstruction term is the
    L2 norm ‖y − ŷ‖ (normalised by Σ‖y − ȳ‖) instead of the squared error. None: never."""
    resample_at: list[float] | None = None
    """topk, batchtopk: fractions of training (in (0, 1)) at which latents restart on that step's
    batch: each pair that fires together on more than cofire_ratio of the more frequent one's rows
    becomes one latent, and every dead latent, with those the merges free, restarts at the
    residual of a row drawn ∝ its squared error (Anthropic's resampling). Such a pair is a parent
    and one child in a rotated basis, which the Matryoshka losses leave in place; e.g. 0.25,0.5.
    None: never."""
    cofire_ratio: float = 0.5
    """resample_at: the share of the more frequent latent's rows a pair must share to be merged (a
    child shares all of its own rows with its parent but few of the parent's)."""
    aux_k: int | None = None
    """Dead latents used by the aux-k loss per token; default d_in // 2 (OpenAI's k_aux = d/2)."""
    aux_coefficient: float = 1 / 32
    """Weight of the aux-k loss (the residual's FVU when reconstructed by dead latents only)."""
    dead_tokens: int | None = None
    """A latent is dead (aux-k trains it) after this many training tokens without firing, counted in
    tokens, not steps, so it means the same at any batch size. Default: a tenth of the run, at most
    10M (OpenAI's window, a tenth of a 10⁸-token run); a fixed 10M never engages in a shorter run."""
    sparse_path: bool = True
    """TopK/BatchTopK: backward through the encoder only at the selected entries and decode by
    gathering decoder rows (no dense B×F gradient). On a GPU the trainer first times this and
    the dense path on a batch and takes the faster. False runs the dense reference math."""

    def __post_init__(self) -> None:
        for name in ("n_prefixes", "dead_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.aux_k is not None and self.aux_k < 1:
            raise ConfigError("aux_k", f"must be at least 1, got {self.aux_k}")
        if self.aux_coefficient < 0 or self.l1_coefficient < 0:
            raise ConfigError("aux_coefficient" if self.aux_coefficient < 0 else "l1_coefficient",
                              "must not be negative")
        self._expand_arch()
        if self.target_l0 is not None and self.rule.penalty_metric is None:
            raise ConfigError("target_l0", f"steers a sparsity penalty (relu, jumprelu); {self.activation} sets L0 by k")
        if self.target_l0 is not None and self.target_l0 <= 0:
            raise ConfigError("target_l0", f"must be above 0, got {self.target_l0}")
        for name in ("bandwidth", "threshold_init"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be above 0, got {getattr(self, name)}")
        if self.l0_coefficient < 0:
            raise ConfigError("l0_coefficient", "must not be negative")
        if self.l0_control_rate <= 0:
            raise ConfigError("l0_control_rate", f"must be above 0, got {self.l0_control_rate}")
        if self.log_epsilon <= 0:
            raise ConfigError("log_epsilon", f"must be above 0, got {self.log_epsilon}")
        if self.snap_fraction is not None and not 0 <= self.snap_fraction <= 1:
            raise ConfigError("snap_fraction", f"is a fraction of training, in [0, 1]; got {self.snap_fraction}")
        if self.resample_at is not None:
            if not self.rule.selects:
                raise ConfigError("resample_at", f"restarts latents of topk and batchtopk, not {self.activation}: "
                                  "leave it out, or train activation topk or batchtopk")
            if not all(0 < f < 1 for f in self.resample_at):
                raise ConfigError("resample_at", f"are fractions of training, each in (0, 1); got {self.resample_at}")
        if not 0 < self.cofire_ratio <= 1:
            raise ConfigError("cofire_ratio", f"is a share of rows, in (0, 1]; got {self.cofire_ratio}")
        if self.levels and self.prefixes != "levels":
            raise ConfigError("levels", f"are the widths of prefixes = levels (prefixes is {self.prefixes})")
        if self.level_weights is not None and self.prefixes != "levels":
            raise ConfigError("level_weights", "applies to fixed levels only (prefixes = levels)")
        if self.spread_levels and self.prefixes != "levels":
            raise ConfigError("spread_levels", "applies to fixed levels only (prefixes = levels)")

    def _expand_arch(self) -> None:
        """Fill activation and prefixes from the `arch` shorthand (kukla.json of every version has one);
        one given beside it must be what the shorthand sets, so neither is overridden without a word."""
        if self.arch is None:
            self.activation = "batchtopk" if self.activation == "auto" else self.activation
            self.prefixes = "levels" if self.prefixes == "auto" else self.prefixes
            return
        if self.arch == "matryoshka-prefix":  # keeps the activation
            activations, schemes = ["batchtopk" if self.activation == "auto" else self.activation], ["sampled", "all"]
        else:
            activations = ["batchtopk" if self.arch == "matryoshka-batchtopk" else self.arch]
            schemes = ["levels" if self.arch == "matryoshka-batchtopk" or self.levels else "none"]
        for name, allowed in (("activation", activations), ("prefixes", schemes)):
            given = getattr(self, name)
            if given != "auto" and given not in allowed:
                raise ConfigError(name, f"arch {self.arch} trains {name} {' or '.join(allowed)}, not {given}: leave "
                                  f"{name} out (auto), or give activation and prefixes without arch")
            setattr(self, name, allowed[0] if given == "auto" else given)

    @property
    def rule(self) -> Rule:
        """The activation rule (`rules/`): everything the code asks about `activation`."""
        from kukla.pipeline.dictionary.rules import rule_named  # torch loads with the rules, not the config

        return rule_named(self.activation)

    @property
    def label(self) -> str:
        """Short name of the combination (sweep members' directories): batchtopk, matryoshka-batchtopk,
        matryoshka-relu (fixed levels), matryoshka-sampled-topk, …"""
        if self.prefixes == "none":
            return self.activation
        return f"matryoshka-{self.activation}" if self.prefixes == "levels" else f"matryoshka-{self.prefixes}-{self.activation}"


@dataclass(kw_only=True)
class DictionaryConfig(DictionarySettings):
    """One sparse dictionary (SAE or transcoder): the shared settings plus its own size."""

    d_in: int
    """Width of the input activations (the input hook's d_model)."""
    width: int
    """Number of latents F."""
    k: float | None = None
    """Active latents per token; for BatchTopK an average over the batch, so it may be fractional.
    Required by topk and batchtopk, unused by relu and jumprelu."""
    d_out: int | None = None
    """Width of the target activations; defaults to d_in. Differs from d_in only for transcoders."""
    transcoder: bool = False
    """Map the input hook's activations to a different target hook's (e.g. mlp_in → mlp_out):
    no input-side decoder bias, the decoder starts at zero and is not norm-constrained."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dead_tokens is None:
            self.dead_tokens = DEAD_TOKENS_MAX
        for name in ("d_in", "width"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.d_out < 1:
            raise ConfigError("d_out", f"must be at least 1, got {self.d_out}")
        if not self.transcoder and self.d_out != self.d_in:
            raise ConfigError("d_out", f"an SAE reconstructs its input: d_out {self.d_out} != d_in {self.d_in} "
                                       "(set transcoder to map one hook to another)")
        if self.aux_k is None:
            self.aux_k = max(1, self.d_in // 2)
        if self.prefixes == "sampled" and self.n_prefixes >= self.width:
            raise ConfigError("n_prefixes", f"draws distinct lengths below width {self.width}; "
                                            f"got {self.n_prefixes} (use prefixes = all for every prefix)")
        self.rule.validate(self)
        self._check_levels()

    def _check_levels(self) -> None:
        if self.prefixes == "levels" and not self.levels:
            self.levels = sorted({max(1, round(f * self.width)) for f in DEFAULT_LEVEL_FRACTIONS})
        if not self.levels:
            self.levels = None
            return
        values = [float(v) for v in self.levels]
        if all(v <= 1 for v in values):  # fractions of the width
            values = [v * self.width for v in values]
        if any(not math.isclose(v, round(v), abs_tol=1e-6) for v in values):
            raise ConfigError("levels", f"level widths must be whole numbers of latents, got {self.levels}")
        widths = [int(round(v)) for v in values]
        if widths[0] < 1 or any(b <= a for a, b in zip(widths, widths[1:])):
            raise ConfigError("levels", f"must be strictly increasing and positive, got {self.levels}")
        if widths[-1] != self.width:
            raise ConfigError("levels", f"must end at width {self.width}, got {widths[-1]}")
        self.levels = widths  # type: ignore[assignment]
        if self.level_weights is not None:
            if len(self.level_weights) != len(widths):
                raise ConfigError("level_weights", f"needs one weight per level ({len(widths)}), "
                                                   f"got {len(self.level_weights)}")
            if any(w < 0 for w in self.level_weights) or sum(self.level_weights) <= 0:
                raise ConfigError("level_weights", "must be non-negative with a positive sum")
