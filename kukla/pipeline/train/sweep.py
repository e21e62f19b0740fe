"""A sweep: several dictionaries trained on the same batches, each with its own optimiser.

Every batch is read from the store once and fed to every member in turn; each member's
graph is freed by its backward before the next member runs, so memory grows with the
members' weights and optimiser state, not with their activations.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from kukla.errors import KuklaError
from kukla.pipeline.dictionary import Dictionary, default_lr
from kukla.pipeline.train.config import Member, TrainConfig, learning_rate
from kukla.pipeline.dictionary.l0_control import adjust_penalty
from kukla.pipeline.dictionary.reorder import reorder_latents
from kukla.pipeline.dictionary.snap import snap_step
from kukla.pipeline.train.distributed import (Ranks, agree, any_rank, average_gradients, broadcast_parameters,
                                              sum_over_ranks)

ADAM_BETAS = (0.9, 0.999)


@dataclass
class Trainee:
    """One member at training time: dictionary, optimiser, and the generator of its random prefixes."""

    member: Member
    dictionary: Dictionary
    optimizer: torch.optim.Adam
    generator: torch.Generator
    base_lr: float
    loss_fn: Callable[..., Any]
    last: dict[str, Tensor] = field(default_factory=dict)
    """Metrics of the latest step, kept as tensors until they are logged (no sync per step)."""

    @property
    def name(self) -> str:
        return self.member.name


def build_trainees(config: TrainConfig, members: list[Member], ranks: Ranks,
                   scales: tuple[float, float | None], init_rows: tuple[Tensor, ...]) -> list[Trainee]:
    """Initialise every member the same way on every rank (seeded; rank 0's copy is broadcast)."""
    trainees = []
    for member in members:
        torch.manual_seed(member.seed)
        dictionary = Dictionary(member.config)
        dictionary.set_scales(*scales)
        dictionary.initialize(*init_rows)
        dictionary.to(ranks.device)
        broadcast_parameters(dictionary, ranks)
        base_lr = config.lr or default_lr(member.config.width)
        optimizer = torch.optim.Adam(dictionary.parameters(), lr=base_lr, betas=ADAM_BETAS)
        generator = torch.Generator(device=ranks.device).manual_seed(member.seed)
        loss_fn = torch.compile(dictionary.training_loss) if config.compile else dictionary.training_loss
        trainees.append(Trainee(member, dictionary, optimizer, generator, base_lr, loss_fn))
    return trainees


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on GPU (weights and optimiser stay fp32); plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(trainees: list[Trainee], acts: tuple[Tensor, ...], step: int, total_steps: int,
               config: TrainConfig, ranks: Ranks, rows: Tensor | None = None) -> None:
    """One optimiser step of every member on one batch (the global batch, under DDP)."""
    x, y = acts[0], (acts[1] if len(acts) > 1 else None)
    snap = snap_step(config.snap_fraction, total_steps)
    l2 = snap is not None and step >= snap
    fired, contributions, bad = [], [], None
    for trainee in trainees:
        with autocast(ranks.device):
            out = trainee.loss_fn(x, y, trainee.generator, l2)
        if not bool(torch.isfinite(out.loss.detach())):  # checked before any optimiser step
            bad = bad or NonFiniteLoss(trainee.name, step, acts, rows)
            continue
        out.loss.backward()
        trainee.last = {"loss": out.loss.detach(), **{k: torch.as_tensor(v).detach() for k, v in out.metrics.items()}}
        if snap is not None:
            trainee.last["snap_l2"] = torch.tensor(float(l2))
        fired.append(out.fired)
        contributions.append(out.contribution)
    if agree(bad is not None, ranks):  # every rank stops together
        raise bad or KuklaError(f"a loss is not finite on another rank at step {step}; lower --lr, "
                                "or check the store for bad rows")
    average_gradients([p for t in trainees for p in t.dictionary.parameters()], ranks)
    fired = any_rank(fired, ranks)
    n_tokens = x.shape[0] * ranks.world
    for trainee, fired_mask, contribution in zip(trainees, fired, contributions):
        dictionary = trainee.dictionary
        dictionary.project_decoder_grads()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(dictionary.parameters(), config.grad_clip)
        lr = learning_rate(config, trainee.base_lr, step, total_steps)
        for group in trainee.optimizer.param_groups:
            group["lr"] = lr
        trainee.optimizer.step()
        trainee.optimizer.zero_grad(set_to_none=True)
        dictionary.normalize_decoder()
        dictionary.update_dead(fired_mask, n_tokens)
        cfg = dictionary.cfg
        if cfg.target_l0 is not None and cfg.activation_rule == "relu":
            l0 = sum_over_ranks(torch.as_tensor(trainee.last["l0"], dtype=torch.float32, device=x.device), ranks)
            adjust_penalty(dictionary, l0 / ranks.world, cfg.target_l0, cfg.l0_control_rate)
        if contribution is not None:  # the same order on every rank: sort by the global mean
            reorder_latents(dictionary, trainee.optimizer, sum_over_ranks(contribution, ranks) / ranks.world)


def step_metrics(trainees: list[Trainee]) -> dict[str, dict[str, float]]:
    """The latest step's figures per member, as floats (one sync), with dead % added."""
    out = {}
    for trainee in trainees:
        values = {k: float(v.float().mean()) for k, v in trainee.last.items()}
        values["dead_pct"] = 100.0 * float(trainee.dictionary.dead_mask().float().mean())
        values["lr"] = trainee.optimizer.param_groups[0]["lr"]
        out[trainee.name] = values
    return out


class NonFiniteLoss(KuklaError):
    """The loss became NaN or inf: training stops, the last good checkpoint is kept."""

    def __init__(self, name: str, step: int, acts: tuple[Tensor, ...], rows: Tensor | None) -> None:
        parts = []
        for label, a in zip(("input", "target"), acts):
            a = a.detach().float()
            finite = torch.isfinite(a)
            bad = int((~finite).sum())
            clean = torch.where(finite, a, torch.zeros_like(a))
            parts.append(f"{label}: {bad} non-finite values, max |x| {float(clean.abs().max()):.3g}, "
                         f"mean norm {float(clean.norm(dim=-1).mean()):.3g}")
        where = ""
        if rows is not None and rows.numel():
            where = f", store rows {int(rows.min())}..{int(rows.max())}"
        self.step = step
        super().__init__(f"loss of {name} is not finite at step {step} (batch of {acts[0].shape[0]} rows{where}; "
                         + "; ".join(parts) + "); lower --lr, or check the store for bad rows")


def oom_hint(config: TrainConfig, n_members: int) -> str:
    """What to reduce when a step runs out of memory."""
    return (f"out of memory: reduce --batch-size (now {config.batch_size}), --width (largest "
            f"{max(config.width)}), or the sweep size (now {n_members} dictionaries)")
