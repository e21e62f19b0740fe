"""A sweep: several dictionaries trained on the same batches, each with its own optimiser.

Every batch is read from the store once and fed to every member in turn; each member's
graph is freed by its backward before the next member runs, so memory grows with the
members' weights and optimiser state, not with their activations.

Each member's training path is chosen once, when it is built (`choose_sparse_path`): on CPU the
sparse path (gathered encoder backward, `embedding_bag` decode) beats the dense reference 2–2.7×
at every size measured (benchmarks/RESULTS.md), so CPUs take it unmeasured. On a GPU the dense
path's matmuls run on tensor cores and the gathers do not, so either can win depending on d, F,
k and the batch: there both are timed before the first step, once per (device, shapes).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from kukla.errors import KuklaError
from kukla.pipeline.dictionary import Dictionary, default_lr, training_loss
from kukla.pipeline.dictionary.loss import snap_step
from kukla.pipeline.dictionary.model import adjust_penalty, reorder_latents, resample_latents
from kukla.pipeline.train.config import Member, TrainConfig, learning_rate
from kukla.pipeline.train.distributed import (Ranks, agree, any_rank, average_gradients, broadcast_parameters,
                                              global_batch)

ADAM_BETAS = (0.9, 0.999)
_MEASURED: dict[tuple[Any, ...], bool] = {}  # (device, shapes) → the sparse path was faster
_REPEATS = 3

logger = logging.getLogger(__name__)


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
    if config.compile and ranks.is_main:  # the train bar stays at 0 while it does
        logger.info("torch.compile: the first step compiles each dictionary's loss (a minute or more)")
    trainees = []
    for member in members:
        torch.manual_seed(member.seed)
        dictionary = Dictionary(member.config)
        dictionary.set_scales(*scales)
        dictionary.initialize(*init_rows)
        dictionary.to(ranks.device)
        broadcast_parameters(dictionary, ranks)
        choose_sparse_path(dictionary, *_batch_like(init_rows, config.local_batch(ranks.world), ranks.device),
                           precision=lambda: autocast(ranks.device))
        base_lr = config.lr or default_lr(member.config.width)
        optimizer = torch.optim.Adam(dictionary.parameters(), lr=base_lr, betas=ADAM_BETAS)
        generator = torch.Generator(device=ranks.device).manual_seed(member.seed)
        loss_fn = functools.partial(training_loss, dictionary)
        loss_fn = torch.compile(loss_fn) if config.compile else loss_fn
        trainees.append(Trainee(member, dictionary, optimizer, generator, base_lr, loss_fn))
    return trainees


def _batch_like(rows: tuple[Tensor, ...], n: int, device: torch.device) -> tuple[Tensor, ...]:
    """n rows (the init rows, repeated if fewer) per hook on the device: what a step's batch looks like."""
    reps = -(-n // rows[0].shape[0])
    return tuple(r.repeat(reps, 1)[:n].to(device) for r in rows)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on GPU (weights and optimiser stay fp32); plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class FiniteCheck:
    """Whether a step's losses were finite, kept on the device until `raise_if_not_finite` reads it.

    The trainer reads it one step late (the previous step's forward is long done by then, so
    the read does not make the host wait) and before anything is logged or checkpointed, so a
    checkpoint never holds weights a non-finite loss has touched.
    """

    step: int
    acts: tuple[Tensor, ...]
    rows: Tensor | None
    bad: Tensor
    """[members] bool on the device."""

    def raise_if_not_finite(self, trainees: list[Trainee], ranks: Ranks) -> None:
        """Stop every rank together if any member's loss was not finite on any rank."""
        if not agree(self.bad.any(), ranks):
            return
        if bool(self.bad.any()):
            raise NonFiniteLoss(trainees[int(self.bad.int().argmax())].name, self.step, self.acts, self.rows)
        raise KuklaError(f"a loss is not finite on another rank at step {self.step}; lower --lr, "
                         "or check the store for bad rows")


def resample_steps(fractions: list[float] | None, total_steps: int) -> frozenset[int]:
    """The steps after which latents restart (`resample_at`), each fraction's nearest step."""
    return frozenset(round(f * total_steps) for f in fractions or ())


def train_step(trainees: list[Trainee], acts: tuple[Tensor, ...], step: int, total_steps: int,
               config: TrainConfig, ranks: Ranks, rows: Tensor | None = None) -> FiniteCheck:
    """One optimiser step of every member on one batch (this rank's share of the global batch).

    Nothing is read back from the device: the metrics stay tensors in `Trainee.last`, and the
    returned check of the losses' finiteness is read by the caller later.
    """
    x, y = acts[0], (acts[1] if len(acts) > 1 else None)
    share = global_batch(ranks)
    snap = snap_step(config.snap_fraction, total_steps)
    l2 = snap is not None and step >= snap
    fired, contributions, bad = [], [], []
    for trainee in trainees:
        with autocast(ranks.device):
            out = trainee.loss_fn(x, y, trainee.generator, share, l2)
        bad.append(~torch.isfinite(out.loss.detach()))
        out.loss.backward()
        trainee.last = {"loss": out.loss.detach(), **out.metrics}
        if snap is not None:
            trainee.last["snap_l2"] = torch.full((), float(l2), device=out.loss.device)  # stacked with the rest
        fired.append(out.fired)
        contributions.append(out.contribution)
    average_gradients([p for t in trainees for p in t.dictionary.parameters()], ranks)
    fired = any_rank(fired, ranks)
    n_tokens = x.shape[0] * ranks.world
    restart = step in resample_steps(config.resample_at, total_steps)
    if restart:  # every rank restarts latents from the whole global batch, so all make the same change
        whole = (share.gather(x), None if y is None else share.gather(y))
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
        if cfg.target_l0 is not None:  # the global batch's L0 steers λ the same way on every rank
            adjust_penalty(dictionary, share.sum(trainee.last["l0"].float()) / share.world, cfg.target_l0,
                           cfg.l0_control_rate)
        if contribution is not None:  # the same order on every rank: sort by the global mean
            reorder_latents(dictionary, trainee.optimizer, share.sum(contribution) / share.world)
        if restart:
            merged, restarted = resample_latents(dictionary, trainee.optimizer, *whole,
                                                 torch.Generator().manual_seed(trainee.member.seed * 1_000_003 + step))
            # the pairs and dead latents are the same on every rank (integer counts); the rows a
            # restart draws rest on a float residual that a GPU's atomic adds may round differently
            broadcast_parameters(dictionary, ranks)
            if ranks.is_main:
                logger.info("%s, step %d: %d co-firing pairs merged, %d latents restarted",
                            trainee.name, step, merged, restarted)
    return FiniteCheck(step, acts, rows, torch.stack(bad))


def step_metrics(trainees: list[Trainee]) -> dict[str, dict[str, float]]:
    """The latest step's figures per member, as floats (one read of the device each), with dead %
    added; also re-sizes aux-k's candidates (`Dictionary.count_dead`)."""
    out = {}
    for trainee in trainees:
        names = list(trainee.last)
        values = dict(zip(names, torch.stack([trainee.last[k].float() for k in names]).tolist())) if names else {}
        values["dead_pct"] = 100.0 * trainee.dictionary.count_dead() / trainee.dictionary.width
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


# --- the training path ----------------------------------------------------------------------------

def choose_sparse_path(dictionary: Dictionary, x: Tensor, y: Tensor | None = None, *, measure: bool | None = None,
                       precision: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext) -> bool:
    """Set and return `dictionary.use_sparse_path`: the faster path on x's device at x's batch size.

    Only a dictionary configured with `sparse_path` is measured (False always runs the dense
    reference). `measure` defaults to: on CUDA. `precision` is the step's autocast context.
    The weights, gradients and random state are left as they were.
    """
    cfg = dictionary.cfg
    if not cfg.sparse_path or not dictionary.rule.selects:
        dictionary.use_sparse_path = cfg.sparse_path
        return dictionary.use_sparse_path
    if not (x.device.type == "cuda" if measure is None else measure):
        dictionary.use_sparse_path = True
        return True
    device = torch.cuda.get_device_name(x.device) if x.device.type == "cuda" else x.device.type
    key = (device, cfg.activation, cfg.prefixes, cfg.d_in, dictionary.d_out, cfg.width, cfg.k, cfg.aux_k, tuple(cfg.levels or ()),
           x.shape[0], x.dtype)
    if key not in _MEASURED:
        _MEASURED[key] = _seconds(dictionary, x, y, True, precision) <= _seconds(dictionary, x, y, False, precision)
    dictionary.use_sparse_path = _MEASURED[key]
    return dictionary.use_sparse_path


def _seconds(dictionary: Dictionary, x: Tensor, y: Tensor | None, sparse: bool,
             precision: Callable[[], contextlib.AbstractContextManager[Any]]) -> float:
    """Median seconds of one forward + backward on this path (after one warm-up)."""
    dictionary.use_sparse_path = sparse
    generator = torch.Generator(device=x.device).manual_seed(0)  # sampled prefixes: leave the global RNG alone
    times = []
    for _ in range(_REPEATS + 1):
        _wait(x)
        start = time.perf_counter()
        with precision():
            loss = training_loss(dictionary, x, y, generator).loss
        loss.backward()
        _wait(x)
        times.append(time.perf_counter() - start)
        dictionary.zero_grad(set_to_none=True)
    return sorted(times[1:])[len(times[1:]) // 2]


def _wait(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
