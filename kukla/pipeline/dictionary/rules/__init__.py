"""Activation rules: how a dictionary turns pre-activations into codes. Here: the `Rule`
protocol and the registry; each rule is a module of its own beside it.

A rule answers every question the rest of the package asks about it: which entries are
active at training time (`select`, as (rows, cols) for the sparse path, or dense `codes`),
the codes at inference (`encode`), whether its inference threshold is calibrated after
training, its sparsity penalty (weighted per latent by the prefix scheme's tail mass), and the
SAELens architecture it saves as. Adding a rule is one module here, subclassing `Rule`, and
one line in `RULES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from kukla.errors import ConfigError, KuklaError
from kukla.pipeline.dictionary.loss import ONE_PROCESS, GlobalBatch

if TYPE_CHECKING:
    from kukla.pipeline.dictionary.config import DictionaryConfig
    from kukla.pipeline.dictionary.model import Dictionary


class Rule:
    """The protocol every activation rule implements; defaults suit a rule without them."""

    name: ClassVar[str]
    needs_k: ClassVar[bool] = True
    """Whether k (active latents per token) sets its sparsity."""
    selects: ClassVar[bool] = True
    """Training picks entries (`select`), so the sparse path applies; else dense `codes`."""
    calibrated: ClassVar[bool] = False
    """Its inference threshold is set on held-out rows after training (`calibrate_threshold`)."""
    penalty_metric: ClassVar[str | None] = None
    """Metric name of its sparsity penalty; None: it has none (and target_l0 cannot steer it)."""
    saelens: ClassVar[tuple[str | None, str | None]]
    """SAELens architecture it saves as: (SAE, transcoder); None where SAELens has none."""
    loads_from: ClassVar[tuple[str, ...]] = ()
    """SAELens architectures that load as this rule."""

    def validate(self, cfg: DictionaryConfig) -> None:
        """Raise a ConfigError for settings this rule cannot train with."""
        if not self.needs_k:
            return
        if cfg.k is None:
            raise ConfigError("k", f"activation {self.name} needs k (active latents per token)")
        if not 0 < cfg.k < cfg.width:
            raise ConfigError("k", f"must be above 0 and below width {cfg.width}, got {cfg.k}")

    def add_state(self, dictionary: Dictionary) -> None:
        """Register the rule's own parameters or buffers on a new dictionary."""

    def select(self, pre: Tensor, cfg: DictionaryConfig, batch: GlobalBatch = ONE_PROCESS) -> tuple[Tensor, Tensor]:
        """(rows, cols) of the active entries, row-major with ascending columns (`selects` rules)."""
        raise NotImplementedError

    def rows_per_token(self, cfg: DictionaryConfig) -> int | None:
        """Active entries per row when every row has the same number (lets all-prefix skip sorting)."""
        return None

    def codes(self, dictionary: Dictionary, pre: Tensor) -> Tensor:
        """Dense training codes from pre-activations that carry the gradient (non-`selects` rules)."""
        raise NotImplementedError

    def penalty(self, dictionary: Dictionary, pre: Tensor, z: Tensor, tail: Tensor, sigma: Tensor) -> Tensor:
        """Mean over rows of Σᵢ tailᵢ·costᵢ, its sparsity penalty (rules with a `penalty_metric`)."""
        raise NotImplementedError

    def penalty_weight(self, cfg: DictionaryConfig) -> float:
        """The penalty's weight λ (where the target-L0 controller starts)."""
        raise NotImplementedError

    def encode(self, dictionary: Dictionary, pre: Tensor) -> Tensor:
        """Dense inference codes [B, F]."""
        raise NotImplementedError

    def threshold(self, dictionary: Dictionary) -> Tensor | None:
        """The per-latent threshold saved for SAELens' JumpReLU; None: the rule has none."""
        return None

    def load_threshold(self, dictionary: Dictionary, threshold: Tensor) -> None:
        """Take a saved threshold back (a rule without one ignores it)."""

    def saelens_fields(self, cfg: DictionaryConfig) -> dict[str, object]:
        """Extra cfg.json fields its SAELens class reads."""
        return {}


class PenalisedRule(Rule):
    """A rule made sparse by a penalty rather than by k: dense codes at training, no k."""

    needs_k = False
    selects = False


# The rule modules subclass Rule and PenalisedRule from this package, so they load after both.
from kukla.pipeline.dictionary.rules.batchtopk import BatchTopK  # noqa: E402
from kukla.pipeline.dictionary.rules.jumprelu import JumpReLU  # noqa: E402
from kukla.pipeline.dictionary.rules.relu import ReLU  # noqa: E402
from kukla.pipeline.dictionary.rules.topk import TopK  # noqa: E402

RULES: dict[str, Rule] = {rule.name: rule for rule in (BatchTopK(), TopK(), ReLU(), JumpReLU())}
"""Every activation rule by its `activation` name."""


def rule_named(name: str) -> Rule:
    """The rule called `name` (the `activation` setting)."""
    if name not in RULES:
        raise KuklaError(f"unknown activation rule {name!r}; expected one of {', '.join(RULES)}")
    return RULES[name]


def rule_loading(saelens_architecture: str) -> Rule | None:
    """The rule a SAELens directory of this architecture loads as; None: not supported."""
    return next((rule for rule in RULES.values() if saelens_architecture in rule.loads_from), None)
