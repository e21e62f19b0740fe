"""Downstream metrics: splice each dictionary's reconstruction into the model.

Per batch of contexts the clean pass and the ablated passes (one per distinct spliced
hook) run ONCE and are reused for every dictionary; each dictionary costs one more pass.
(The anchors run clean, ablated and spliced passes again for every dictionary.)

    CE recovered = (CE_ablated − CE_dict) / (CE_ablated − CE_clean)
    ΔLM loss     = CE_dict − CE_clean    (nats per predicted token the splice adds)
    KL score     = 1 − KL(clean ‖ dict) / KL(clean ‖ ablated)

Two ablations: the mean of the hook over held-out rows (the honest baseline: below 0 means the
splice hurts more than knowing nothing but the mean) and zero. `ce_loss_recovered` and
`kl_score` are the mean-ablation figures when the mean is given, else the zero-ablation ones.

CE is the mean next-token cross-entropy over every predicted token; KL is the mean over
every position. An SAE replaces its hook's activation with `forward(x)`; a transcoder
reads its input hook and replaces its output hook, so it is spliced at the output hook.
Only positions ≥ `first_position` are replaced (the store may leave out BOS tokens,
whose activations the dictionary never saw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from kukla.progress import progress


@dataclass
class Splice:
    """How one dictionary enters the model: read `input_hook`, replace `target_hook`."""

    input_hook: str
    target_hook: str
    forward: Callable[[Tensor], Tensor]


@dataclass
class _Sums:
    ce: float = 0.0
    kl: float = 0.0


def _token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Sum of next-token cross-entropies of a batch (float64)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None]).double().sum()


def _kl_sum(clean_logp: Tensor, logits: Tensor) -> Tensor:
    """Σ over positions of KL(clean ‖ other) (float64)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (clean_logp.exp() * (clean_logp - logp)).sum(-1).double().sum()


def _replace(value: Tensor, first_position: int) -> Callable[[Tensor, Any], Tensor]:
    def hook(act: Tensor, hook: Any) -> Tensor:
        act = act.clone()
        act[:, first_position:] = value[:, first_position:].to(act.dtype)
        return act

    return hook


class DownstreamEvaluator:
    """Accumulates CE/KL for every dictionary over batches of token contexts."""

    def __init__(self, model: HookedTransformer, splices: dict[str, Splice], *, first_position: int = 0,
                 mean_ablation: dict[str, Tensor] | None = None) -> None:
        self.model = model
        self.splices = splices
        self.first_position = first_position
        self.ablations: dict[str, Callable[[Tensor], Tensor]] = {}
        for hook in sorted({s.target_hook for s in splices.values()}):
            self.ablations[f"zero:{hook}"] = lambda act: torch.zeros_like(act)
            if mean_ablation is not None and hook in mean_ablation:
                mean = mean_ablation[hook]
                self.ablations[f"mean:{hook}"] = lambda act, mean=mean: mean.to(act).expand_as(act)
        self.clean_ce = 0.0
        self.n_predicted = 0
        self.n_positions = 0
        self.ablated = {key: _Sums() for key in self.ablations}
        self.spliced = {name: _Sums() for name in splices}

    def _run_replacing(self, tokens: Tensor, hook: str, make: Callable[[Tensor], Tensor]) -> Tensor:
        def fn(act: Tensor, hook: Any) -> Tensor:
            return _replace(make(act), self.first_position)(act, hook)

        return self.model.run_with_hooks(tokens, fwd_hooks=[(hook, fn)], return_type="logits")

    def _run_splice(self, tokens: Tensor, splice: Splice) -> Tensor:
        if splice.input_hook == splice.target_hook:
            return self._run_replacing(tokens, splice.target_hook, splice.forward)
        cache: dict[str, Tensor] = {}

        def keep(act: Tensor, hook: Any) -> None:
            cache["x"] = act

        def put(act: Tensor, hook: Any) -> Tensor:
            return _replace(splice.forward(cache["x"]), self.first_position)(act, hook)

        return self.model.run_with_hooks(
            tokens, fwd_hooks=[(splice.input_hook, keep), (splice.target_hook, put)], return_type="logits")

    @torch.inference_mode()
    def update(self, tokens: Tensor) -> None:
        """Run one batch of contexts [batch, ctx]: clean and ablated once, then each dictionary."""
        tokens = tokens.to(self.model.cfg.device)
        clean = self.model(tokens, return_type="logits")
        clean_logp = torch.log_softmax(clean.float(), dim=-1)
        self.clean_ce += _token_ce(clean, tokens).item()
        self.n_predicted += tokens.shape[0] * (tokens.shape[1] - 1)
        self.n_positions += tokens.numel()
        for key, ablate in self.ablations.items():
            logits = self._run_replacing(tokens, key.split(":", 1)[1], ablate)
            self.ablated[key].ce += _token_ce(logits, tokens).item()
            self.ablated[key].kl += _kl_sum(clean_logp, logits).item()
        for name, splice in self.splices.items():
            logits = self._run_splice(tokens, splice)
            self.spliced[name].ce += _token_ce(logits, tokens).item()
            self.spliced[name].kl += _kl_sum(clean_logp, logits).item()

    def results(self) -> dict[str, dict[str, float]]:
        """Per dictionary: CE (clean, ablated, spliced), CE recovered, ΔLM loss, KL and KL score."""
        n_pred, n_pos = max(self.n_predicted, 1), max(self.n_positions, 1)
        clean = self.clean_ce / n_pred
        out: dict[str, dict[str, float]] = {}
        for name, splice in self.splices.items():
            ce = self.spliced[name].ce / n_pred
            kl = self.spliced[name].kl / n_pos
            row = {"ce_loss_clean": clean, "ce_loss_spliced": ce, "delta_lm_loss": ce - clean, "kl_div": kl}
            for kind in ("zero", "mean"):
                sums = self.ablated.get(f"{kind}:{splice.target_hook}")
                if sums is None:
                    continue
                ablated_ce, ablated_kl = sums.ce / n_pred, sums.kl / n_pos
                row[f"ce_loss_{kind}_ablation"] = ablated_ce
                row[f"ce_loss_recovered_{kind}_ablation"] = (
                    (ablated_ce - ce) / (ablated_ce - clean) if ablated_ce != clean else float("nan"))
                row[f"kl_div_{kind}_ablation"] = ablated_kl
                row[f"kl_score_{kind}_ablation"] = 1.0 - kl / ablated_kl if ablated_kl > 0 else float("nan")
            first = "mean" if f"ce_loss_recovered_mean_ablation" in row else "zero"
            row["baseline"] = f"{first} ablation"
            row["ce_loss_recovered"] = row[f"ce_loss_recovered_{first}_ablation"]
            row["kl_score"] = row[f"kl_score_{first}_ablation"]
            out[name] = row
        return out


def evaluate_downstream(model: HookedTransformer, contexts: Tensor, splices: dict[str, Splice], *,
                        batch_size: int = 8, first_position: int = 0,
                        mean_ablation: dict[str, Tensor] | None = None) -> dict[str, dict[str, float]]:
    """CE recovered, ΔLM loss and KL score of each splice on `contexts` [n, ctx]."""
    evaluator = DownstreamEvaluator(model, splices, first_position=first_position, mean_ablation=mean_ablation)
    with progress(contexts.numel(), "downstream (CE/KL)") as bar:
        for start in range(0, contexts.shape[0], batch_size):
            batch = contexts[start:start + batch_size]
            evaluator.update(batch)
            bar.update(batch.numel())
    return evaluator.results()
