"""How well a dictionary reconstructs: in activation space (EV, MSE, L0: `ReconstructionStats`)
and spliced into the model (CE/KL: `DownstreamEvaluator`), each summed exactly over batches.

    EV  = 1 − Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − x̄‖²      (x̄: the mean over all eval tokens)
    FVU = 1 − EV
    MSE = Σ_t ‖x_t − x̂_t‖² / (n_tokens · d)

Sums are kept in float64 and the centred sum of squares is merged batch by batch with
Chan's parallel update, so every figure is the same whatever the batch size. (SAEBench
0.6.0 divides by the variance around zero, scoring 0.904 for the mean predictor, and its
MSE depends on the batch size; neither is repeated here.)

For Matryoshka dictionaries each level w is scored with its own prefix of the codes:
x̂_w = decode(z with latents ≥ w zeroed), and L0_w counts only latents < w.

Per-row errors, norms and L0 are kept too (a few bytes a row), for what a handful of tokens
can hide: EV without the massive-activation rows, the tail of the L0 distribution, the worst rows.
Without rows S:  Σ_{t∉S} ‖x_t − x̄'‖² = Σ_{t∉S} ‖x_t‖² − ‖Σ_t x_t − Σ_{t∈S} x_t‖² / (n − |S|).

Downstream, each dictionary's reconstruction replaces the model's activation. Per batch of
contexts the clean pass and the ablated passes (one per distinct spliced hook) run ONCE and are
reused for every dictionary; each dictionary costs one more pass. (The anchors run clean,
ablated and spliced passes again for every dictionary.)

    CE recovered = (CE_ablated − CE_dict) / (CE_ablated − CE_clean)
    ΔLM loss     = CE_dict − CE_clean    (nats per predicted token the splice adds)
    KL score     = 1 − KL(clean ‖ dict) / KL(clean ‖ ablated)

Two ablations: the mean of the hook over held-out rows (the honest baseline: below 0 means the
splice hurts more than knowing nothing but the mean) and zero. `ce_loss_recovered` and
`kl_score` are the mean-ablation figures when the mean is given, else the zero-ablation ones.

CE is the mean next-token cross-entropy over every predicted token; KL is the mean over
every position. An SAE replaces its hook's activation with `forward(x)`; a transcoder
reads its input hook and replaces its output hook, so it is spliced at the output hook.
Positions holding an `unspliced` token keep the model's own activation, in the ablated passes
too: the harvest leaves out BOS, separators, pads and other special tokens, so the dictionary
never saw their activations (`tests/evaluate/test_downstream.py` checks both against a hand splice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from kukla.pipeline.hooks import enable_hooks
from kukla.progress import progress

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

DENSE_THRESHOLDS = (0.01, 0.1)
"""A latent is 'dense' when it fires on more than this fraction of eval tokens."""


class CentredSumOfSquares:
    """Σ_t ‖x_t − x̄‖² over a stream, x̄ the mean of all tokens seen (Chan et al.'s merge)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.total = 0.0

    def update(self, x: Tensor) -> None:
        x = x.detach().double()
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = (x - mean_b).pow(2).sum().item()
        if self.mean is None:
            self.n, self.mean, self.total = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.total += m2_b + delta.pow(2).sum().item() * self.n * n_b / n
        self.mean = self.mean + delta * (n_b / n)
        self.n = n


def explained_variance(residual_sum_sq: float, centred_sum_sq: float) -> float:
    """1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (NaN when the targets do not vary at all)."""
    return 1.0 - residual_sum_sq / centred_sum_sq if centred_sum_sq > 0 else float("nan")


class ReconstructionStats:
    """Running reconstruction/sparsity sums for one dictionary on the eval tokens."""

    def __init__(self, width: int, levels: list[int]) -> None:
        self.width = width
        self.levels = list(levels)
        self.target = CentredSumOfSquares()
        self.residual_sum_sq = 0.0
        self.level_residual_sum_sq = [0.0] * len(self.levels)
        self.level_l0_sum = [0] * len(self.levels)
        self.cosine_sum = 0.0
        self.n_tokens = 0
        self.d = 0
        self.l0_counts = torch.zeros(1, dtype=torch.long)
        self.fire_counts = torch.zeros(width, dtype=torch.long)
        self.activation_sum = torch.zeros(width, dtype=torch.float64)
        self.activation_max = torch.full((width,), float("-inf"), dtype=torch.float64)
        self.row_parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # (rows, ‖x‖², level errors, L0)

    def update(self, target: Tensor, recon: Tensor, z: Tensor, level_recons: list[Tensor] | None = None,
               rows: Tensor | None = None) -> None:
        """Add a batch: target activations, the full reconstruction, codes, per-level reconstructions
        and the batch's store rows (default: counted from 0)."""
        target, recon, z = target.detach(), recon.detach(), z.detach()
        self.target.update(target)
        t64 = target.double()
        row_error = (t64 - recon.double()).pow(2).sum(1)
        self.residual_sum_sq += row_error.sum().item()
        self.cosine_sum += torch.nn.functional.cosine_similarity(t64, recon.double(), dim=-1).sum().item()
        self.n_tokens += target.shape[0]
        self.d = target.shape[1]
        active = z != 0
        l0 = active.sum(1).cpu()
        counts = torch.bincount(l0, minlength=self.l0_counts.numel())
        if counts.numel() > self.l0_counts.numel():
            self.l0_counts = torch.nn.functional.pad(self.l0_counts, (0, counts.numel() - self.l0_counts.numel()))
        self.l0_counts += counts
        self.fire_counts += active.sum(0).cpu()
        self.activation_sum += z.double().sum(0).cpu()
        self.activation_max = torch.maximum(self.activation_max, z.double().max(0).values.cpu())
        level_errors = []
        for i, width in enumerate(self.levels):
            self.level_l0_sum[i] += int(active[:, :width].sum().item())
            if level_recons is not None:
                level_errors.append((t64 - level_recons[i].double()).pow(2).sum(1))
                self.level_residual_sum_sq[i] += level_errors[-1].sum().item()
        if rows is None:
            rows = torch.arange(self.n_tokens - target.shape[0], self.n_tokens)
        errors = torch.stack(level_errors[:-1] + [row_error], 1) if level_errors else row_error[:, None]
        self.row_parts.append((rows.cpu().long(), t64.pow(2).sum(1).cpu(), errors.cpu(), l0))

    def per_row(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Store rows, ‖x‖², squared errors [rows, levels] (last: the full width) and L0 of every row seen."""
        if len(self.row_parts) > 1:
            self.row_parts = [tuple(torch.cat(parts) for parts in zip(*self.row_parts))]  # type: ignore[list-item]
        if not self.row_parts:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)
        return self.row_parts[0]

    def tails(self, excluded: Tensor, excluded_sum: Tensor, *, worst: int = 5) -> dict[str, Any]:
        """EV (full and per level) without the `excluded` store rows (Σ of their targets: excluded_sum),
        the L0 tail (nearest-rank p99, p99.9, max) and the `worst` rows by squared error."""
        rows, norm_sq, errors, l0 = self.per_row()
        out_mask = torch.isin(rows, excluded)
        keep = ~out_mask
        n_keep = int(keep.sum())
        total_sum = self.target.mean * self.target.n if self.target.mean is not None else torch.zeros(1)
        kept_sum = total_sum - excluded_sum.double()
        centred = float(norm_sq[keep].sum() - kept_sum.pow(2).sum() / n_keep) if n_keep else float("nan")
        level_ev = [explained_variance(float(errors[keep, i].sum()), centred) for i in range(errors.shape[1])]
        norms = norm_sq.sqrt()
        median = float(norms.median()) if norms.numel() else float("nan")
        total_error = max(self.residual_sum_sq, 1e-300)
        order = errors[:, -1].argsort(descending=True)[:worst]
        ranked = l0.sort().values

        def rank(p: float) -> int:
            return int(ranked[max(0, math.ceil(p * ranked.numel()) - 1)]) if ranked.numel() else 0

        return {
            "explained_variance_without_massive": level_ev[-1],
            "massive_rows_excluded": int(out_mask.sum()),
            "massive_variance_share": (0.0 if not out_mask.any() else max(0.0, 1.0 - centred / self.target.total))
                                      if self.target.total > 0 else float("nan"),  # none excluded: 0, not 1e-16
            "levels_without_massive": [{"width": w, "explained_variance": ev}
                                       for w, ev in zip(self.levels, level_ev)] if len(level_ev) > 1 else [],
            "l0_tail": {"p99": rank(0.99), "p99.9": rank(0.999), "max": int(ranked[-1]) if ranked.numel() else 0},
            "worst_rows": [{"row": int(rows[i]), "error_share": float(errors[i, -1]) / total_error,
                            "norm_over_median": float(norms[i]) / median, "l0": int(l0[i]),
                            "massive": bool(out_mask[i])} for i in order.tolist()],
        }

    @property
    def density(self) -> Tensor:
        """Fraction of eval tokens on which each latent fired."""
        return self.fire_counts.double() / max(self.n_tokens, 1)

    def summary(self, density_bins: int = 40) -> dict[str, Any]:
        """The JSON-ready metrics: EV, FVU, MSE, cosine, L0, dead/dense counts, histograms, levels."""
        n = max(self.n_tokens, 1)
        ev = explained_variance(self.residual_sum_sq, self.target.total)
        l0_values = torch.arange(self.l0_counts.numel(), dtype=torch.float64)
        density = self.density
        alive = density > 0
        log_density = torch.log10(density[alive])
        lo = -math.log10(n) if n > 1 else -1.0  # the rarest possible firing: once
        hist = torch.histc(log_density, bins=density_bins, min=lo, max=0.0) if alive.any() else torch.zeros(density_bins)
        edges = torch.linspace(lo, 0.0, density_bins + 1)
        out: dict[str, Any] = {
            "n_tokens": self.n_tokens,
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "mse": self.residual_sum_sq / (n * max(self.d, 1)),
            "cosine": self.cosine_sum / n,
            "l0": float((self.l0_counts.double() * l0_values).sum().item() / n),
            "l0_histogram": {"l0": list(range(self.l0_counts.numel())), "count": self.l0_counts.tolist()},
            "dead_latents": int((~alive).sum().item()),
            "dead_fraction": float((~alive).double().mean().item()),
            "log10_density_histogram": {"edges": edges.tolist(), "count": hist.long().tolist()},
        }
        for threshold in DENSE_THRESHOLDS:
            out[f"dense_latents_above_{threshold:g}"] = int((density > threshold).sum().item())
        out["levels"] = [
            {
                "width": width,
                "explained_variance": explained_variance(self.level_residual_sum_sq[i], self.target.total),
                "l0": self.level_l0_sum[i] / n,
            }
            for i, width in enumerate(self.levels)
        ]
        return out

    def latent_columns(self) -> dict[str, Tensor]:
        """Per-latent density, mean activation when active, and max activation."""
        fired = self.fire_counts.clamp(min=1).double()
        mean_active = torch.where(self.fire_counts > 0, self.activation_sum / fired, torch.zeros_like(fired))
        max_act = torch.where(self.fire_counts > 0, self.activation_max, torch.zeros_like(fired))
        return {"density": self.density, "mean_activation": mean_active, "max_activation": max_act}


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


def _put(act: Tensor, value: Tensor, replaced: Tensor) -> Tensor:
    """`value` where `replaced` [batch, ctx] is true, the model's own `act` elsewhere."""
    return torch.where(replaced.view(*replaced.shape, *[1] * (act.ndim - 2)), value.to(act.dtype), act)


class DownstreamEvaluator:
    """Accumulates CE/KL for every dictionary over batches of token contexts."""

    def __init__(self, model: HookedTransformer, splices: dict[str, Splice], *, unspliced: Sequence[int] = (),
                 mean_ablation: dict[str, Tensor] | None = None) -> None:
        self.model = model
        self.splices = splices
        self.unspliced = torch.tensor(sorted(set(unspliced)), dtype=torch.long, device=model.cfg.device)
        # A gated hook (hook_mlp_in, …) never fires without its flag: a splice there would be skipped.
        enable_hooks(model, sorted({h for s in splices.values() for h in (s.input_hook, s.target_hook)}))
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

    def _run_replacing(self, tokens: Tensor, replaced: Tensor, hook: str, make: Callable[[Tensor], Tensor]) -> Tensor:
        def fn(act: Tensor, hook: Any) -> Tensor:
            return _put(act, make(act), replaced)

        return self.model.run_with_hooks(tokens, fwd_hooks=[(hook, fn)], return_type="logits")

    def _run_splice(self, tokens: Tensor, replaced: Tensor, splice: Splice) -> Tensor:
        if splice.input_hook == splice.target_hook:
            return self._run_replacing(tokens, replaced, splice.target_hook, splice.forward)
        cache: dict[str, Tensor] = {}

        def keep(act: Tensor, hook: Any) -> None:
            cache["x"] = act

        def put(act: Tensor, hook: Any) -> Tensor:
            return _put(act, splice.forward(cache["x"]), replaced)

        return self.model.run_with_hooks(
            tokens, fwd_hooks=[(splice.input_hook, keep), (splice.target_hook, put)], return_type="logits")

    @torch.inference_mode()
    def update(self, tokens: Tensor) -> None:
        """Run one batch of contexts [batch, ctx]: clean and ablated once, then each dictionary."""
        tokens = tokens.to(self.model.cfg.device)
        replaced = ~torch.isin(tokens, self.unspliced)
        clean = self.model(tokens, return_type="logits")
        clean_logp = torch.log_softmax(clean.float(), dim=-1)
        self.clean_ce += _token_ce(clean, tokens).item()
        self.n_predicted += tokens.shape[0] * (tokens.shape[1] - 1)
        self.n_positions += tokens.numel()
        for key, ablate in self.ablations.items():
            logits = self._run_replacing(tokens, replaced, key.split(":", 1)[1], ablate)
            self.ablated[key].ce += _token_ce(logits, tokens).item()
            self.ablated[key].kl += _kl_sum(clean_logp, logits).item()
        for name, splice in self.splices.items():
            logits = self._run_splice(tokens, replaced, splice)
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
            first = "mean" if "ce_loss_recovered_mean_ablation" in row else "zero"
            row["baseline"] = f"{first} ablation"
            row["ce_loss_recovered"] = row[f"ce_loss_recovered_{first}_ablation"]
            row["kl_score"] = row[f"kl_score_{first}_ablation"]
            out[name] = row
        return out


def evaluate_downstream(model: HookedTransformer, contexts: Tensor, splices: dict[str, Splice], *,
                        batch_size: int = 8, unspliced: Sequence[int] = (),
                        mean_ablation: dict[str, Tensor] | None = None) -> dict[str, dict[str, float]]:
    """CE recovered, ΔLM loss and KL score of each splice on `contexts` [n, ctx]; positions holding an
    `unspliced` token id keep the model's activation."""
    evaluator = DownstreamEvaluator(model, splices, unspliced=unspliced, mean_ablation=mean_ablation)
    with progress(contexts.numel(), "downstream (CE/KL)") as bar:
        for start in range(0, contexts.shape[0], batch_size):
            batch = contexts[start:start + batch_size]
            evaluator.update(batch)
            bar.update(batch.numel())
    return evaluator.results()
