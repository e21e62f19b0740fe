"""Activation rules: how a dictionary turns pre-activations into codes, one module per rule.

A rule answers every question the rest of the package asks about it: which entries are
active at training time (`select`, as (rows, cols) for the sparse path, or dense `codes`),
the codes at inference (`encode`), whether its inference threshold is calibrated after
training, its sparsity penalty (weighted per latent by the prefix scheme's tail mass), and the
SAELens architecture it saves as. Adding a rule is one module here and one line in `RULES`.
"""

from __future__ import annotations

from kukla.errors import KuklaError
from kukla.pipeline.dictionary.rules.batchtopk import BatchTopK
from kukla.pipeline.dictionary.rules.jumprelu import JumpReLU
from kukla.pipeline.dictionary.rules.relu import ReLU
from kukla.pipeline.dictionary.rules.rule import Rule
from kukla.pipeline.dictionary.rules.topk import TopK

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
