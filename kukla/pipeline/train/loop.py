"""The training run: store → sweep of dictionaries, with checkpoints, resume and calibration.

`train(config) -> list[Path]` is the Python entry point, and what `kukla train` calls.

Exact resume: a checkpoint holds everything the next step depends on (weights and
buffers, Adam moments, every random generator, each rank's stream cursor, the step), so
a run killed after checkpoint N and resumed computes the same steps N+1… as a run that
never stopped, and ends with identical weights.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator
from logging import getLogger
from pathlib import Path
from typing import Any

import torch

from kukla.config import to_dict
from kukla.errors import KuklaError, Preempted, checkpoint_on_sigterm, sigterm_requested
from kukla.pipeline.dictionary import calibrate_threshold, calibration_rows, save_dictionary
from kukla.pipeline.massive import massive_rows
from kukla.pipeline.train import checkpoint
from kukla.pipeline.train.config import TrainConfig, WandbConfig
from kukla.pipeline.train.distributed import (Ranks, agree, barrier, close_ranks, gather_objects, init_ranks,
                                              sum_over_ranks)
from kukla.pipeline.train.log import TrainLog, start_wandb
from kukla.pipeline.train.sweep import (FiniteCheck, NonFiniteLoss, Trainee, build_trainees, oom_hint, step_metrics,
                                        train_step)
from kukla.progress import progress
from kukla.storage import ActivationStream, Store, batches_per_epoch, open_store
from kukla.storage.location import Lease, Location, check_output_dir
from kukla.storage.stream import Batch

logger = getLogger(__name__)  # `logging` names the logging steps below

#: Settings that may change between a run and its resumption (they do not touch the math; the
#: store and `out` are paths, and a rescheduled job may reach the same folders by other ones).
RESUMABLE_CHANGES = {"resume", "wandb", "threads", "log_every",
                     "checkpoint_every", "keep_checkpoints", "prefetch", "compile", "device", "store", "out"}
#: Bumped whenever what a checkpoint holds changes meaning (2: global-batch shares, l0_cap, reordering buffers).
CHECKPOINT_FORMAT = 2
#: Held-out rows used to calibrate a periodic checkpoint (the final one uses calibration_tokens).
CHECKPOINT_CALIBRATION_ROWS = 32768


def open_checked_store(config: TrainConfig) -> Store:
    """The store, or a one-line error if it is missing, unfinished, or lacks a hook."""
    store = open_store(config.store)
    for hook in config.hooks:
        if hook not in store.hooks:
            near = difflib.get_close_matches(hook, list(store.hooks), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise KuklaError(f"hook {hook!r} is not in store {config.store}; {hint}"
                             f"it holds: {', '.join(sorted(store.hooks))}")
    return store


def init_rows(store: Store, config: TrainConfig) -> tuple[torch.Tensor, ...]:
    """The first init_tokens training rows of each hook: every rank reads the same ones."""
    n = min(config.init_tokens, store.n_rows - store.holdout_rows)
    return tuple(store.read(hook, 0, n).float() for hook in config.hooks)


def mean_norms(store: Store, config: TrainConfig) -> tuple[float, float | None]:
    """E‖x‖ of the input hook (and of the target hook, for a transcoder): the dictionaries' scales."""
    target = store.hook_stats(config.hooks[-1])["mean_norm"] if len(config.hooks) > 1 else None
    return store.hook_stats(config.hooks[0])["mean_norm"], target


def train(config: TrainConfig) -> list[Path]:
    """Train every dictionary of `config`'s sweep; returns their directories under `config.out`.

    Under torchrun, every rank calls this; rank 0 writes the outputs, and every rank
    returns the same paths.
    """
    ranks = init_ranks(config.device)
    if ranks.device.type == "cpu" or config.threads is not None:
        torch.set_num_threads(config.threads_default())
    try:
        return run(config, ranks)
    except torch.cuda.OutOfMemoryError:
        raise KuklaError(oom_hint(config, len(config.width) * len(config.k) * len(config.seed))) from None
    except RuntimeError as exc:  # the CPU allocator reports running out this way
        if "can't allocate memory" in str(exc) or "not enough memory" in str(exc):
            raise KuklaError(oom_hint(config, len(config.width) * len(config.k) * len(config.seed))) from None
        raise
    finally:
        close_ranks(ranks)


def run(config: TrainConfig, ranks: Ranks) -> list[Path]:
    """Train every member of the sweep; returns the final dictionary directories.

    Rank 0 holds a lease on `--out` (a second live trainer there is refused). After SIGTERM
    every rank stops at the same step (the next one; under DDP the next logging step), a
    checkpoint is written and `Preempted` raised (the CLI exits 143); `--resume` continues exactly.
    """
    check_output_dir(config.out, "--out")
    store = open_checked_store(config)  # before the lease makes --out: a bad store leaves nothing behind
    config.local_batch(ranks.world)  # and a batch the ranks cannot share equally
    lease = Lease(Location(config.out), "lock.json", f"training run {config.out}") if ranks.is_main else None
    try:
        if lease is not None:
            lease.acquire()
        with checkpoint_on_sigterm():
            return _train(config, ranks, lease, store)
    finally:
        if lease is not None:
            lease.release()


def _train(config: TrainConfig, ranks: Ranks, lease: Lease | None, store: Store) -> list[Path]:
    hooks = config.hooks
    members = config.members(store.hooks[hooks[0]], store.hooks[hooks[-1]])
    total_steps = config.total_steps(ranks.world)
    local_batch = config.local_batch(ranks.world)
    out = Path(config.out)
    state = _resume_state(config, ranks, store)
    if config.massive == "skip" and ranks.world > 1:  # the ranks' shares of a global batch must stay equal
        raise KuklaError("massive = 'skip' trains in one process only for now: under torchrun use 'keep'")
    skipped = massive_rows(store) if config.massive == "skip" else None

    train_rows = store.n_rows - store.holdout_rows
    trainees = build_trainees(config, members, ranks, mean_norms(store, config), init_rows(store, config))
    per_epoch = batches_per_epoch(store, local_batch, split="train", world=ranks.world)
    if per_epoch == 0:
        raise KuklaError(f"store {config.store} has {train_rows} training rows, fewer than one batch "
                         f"(--batch-size {config.batch_size}); lower it or harvest more tokens")
    epochs = math.ceil(total_steps / per_epoch)
    stream = ActivationStream(store, list(hooks), local_batch, split="train", rank=ranks.rank, world=ranks.world,
                              epochs=epochs, seed=config.seed[0] if config.data_seed is None else config.data_seed,
                              device=ranks.device,
                              prefetch=config.prefetch, with_rows=True)
    step, checkpointed_id = 0, None
    if state is not None:
        step, checkpointed_id = state["step"], state.get("wandb_id")  # only older kuklas' checkpoints hold one
        _restore(state, trainees, stream, ranks)

    wandb_run = None
    if config.wandb.enabled and ranks.is_main:
        wandb_run = start_wandb(out, config.wandb.project, config.wandb.name or out.name, _run_identity(config, store),
                                checkpointed_id, to_dict(config))
    elif ranks.is_main and config.wandb != WandbConfig(enabled=False):  # a project or name alone turns nothing on
        logger.warning("W&B is off, so wandb.project / wandb.name log nowhere: add --wandb (wandb = true) to log")
    log = TrainLog(out, total_steps * config.batch_size, start_tokens=step * config.batch_size,
                   start_step=step, enabled=ranks.is_main, wandb_run=wandb_run)
    if ranks.is_main and config.dead_window >= config.tokens:
        logger.warning("dead_tokens %s ≥ the run's %s tokens: no latent can be dead, so aux-k never engages",
                       f"{config.dead_window:,}", f"{config.tokens:,}")
    batches = iter(stream)
    pending: FiniteCheck | None = None  # the latest step's finiteness, read one step late
    try:
        while step < total_steps:
            batch = next(batches, None)
            if batch is None:
                raise KuklaError(f"the store's stream ended at step {step} of {total_steps}; "
                                 "this is a bug in the epoch count, please report it")
            if skipped is not None:
                batch = without_rows(batch, skipped)
            check = train_step(trainees, batch.acts, step, total_steps, config, ranks, batch.rows)
            if ranks.world == 1:  # one step late: long computed, so reading it makes nothing wait
                _verify(pending, trainees, ranks, out)
            pending, step = check, step + 1  # under DDP agreeing is a collective: only where logging pays it
            log.advance(config.batch_size)
            logging = step % config.log_every == 0 or step == total_steps
            if lease is not None:
                lease.check()
            stop = step < total_steps and _stop_requested(step, config, ranks)
            saving = stop or (bool(config.checkpoint_every) and step % config.checkpoint_every == 0
                              and step < total_steps)
            if logging or saving:  # nothing is logged or saved before the steps behind it are known finite
                _verify(pending, trainees, ranks, out)
                pending = None
            if logging:
                log.record(step, step * config.batch_size, _averaged_metrics(trainees, ranks))
            if saving:
                _checkpoint(config, store, trainees, stream, step, ranks,
                            min(CHECKPOINT_CALIBRATION_ROWS, config.calibration_tokens))
            if stop:
                raise Preempted(f"SIGTERM after step {step} of {total_steps}: a checkpoint is written; "
                                "rerun with --resume to continue exactly")
        _verify(pending, trainees, ranks, out)
        final = _checkpoint(config, store, trainees, stream, step, ranks, config.calibration_tokens)
        outputs = checkpoint.publish_final(final, trainees, out, ranks, log)
    finally:
        batches.close()  # stops the stream's prefetch thread
        log.close()
    return outputs


def without_rows(batch: Batch, rows: torch.Tensor) -> Batch:
    """The batch less the given store rows."""
    keep = ~torch.isin(batch.rows, rows.to(batch.rows.device))
    return Batch(tuple(a[keep.to(a.device)] for a in batch.acts), batch.rows[keep])


def _verify(check: FiniteCheck | None, trainees: list[Trainee], ranks: Ranks, out: Path) -> None:
    """Stop with a one-line error if a step's loss was not finite (the last good checkpoint stays)."""
    if check is None:
        return
    try:
        check.raise_if_not_finite(trainees, ranks)
    except NonFiniteLoss as exc:
        latest = checkpoint.latest_checkpoint(out)
        kept = f"the last good checkpoint {latest} is kept" if latest else "no checkpoint was written yet"
        raise KuklaError(f"{exc}; {kept}") from None


def _stop_requested(step: int, config: TrainConfig, ranks: Ranks) -> bool:
    """SIGTERM seen, by every rank at the same step: each step alone, at logging steps under DDP
    (agreeing is a collective and a device sync, which logging pays already)."""
    if ranks.world == 1:
        return sigterm_requested()
    return step % config.log_every == 0 and agree(sigterm_requested(), ranks)


def _run_identity(config: TrainConfig, store: Store) -> dict[str, Any]:
    """What makes a training run the one it is: every setting --resume must keep, and the store's rows."""
    return {**{k: v for k, v in to_dict(config).items() if k not in RESUMABLE_CHANGES}, "store": store.identity}


def _resume_state(config: TrainConfig, ranks: Ranks, store: Store) -> dict[str, Any] | None:
    latest = checkpoint.latest_checkpoint(config.out)
    if latest is None:
        return None
    if not config.resume:
        raise KuklaError(f"{config.out} already holds a training run; pass --resume to continue it, "
                         "or choose another --out")
    state = checkpoint.load_state(latest)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise KuklaError(f"--resume: {latest} was written by another kukla (checkpoint format {state.get('format')}, "
                         f"this one reads {CHECKPOINT_FORMAT}); resume with that version, or train into a new --out")
    saved, now = state["config"], to_dict(config)
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        raise KuklaError(f"--resume: {changed[0]} differs from the run in {config.out} "
                         f"({saved.get(changed[0])!r} there, {now[changed[0]]!r} now); resume with the same settings")
    if state.get("store", store.identity) != store.identity:  # "store" may change: the path, not the rows
        raise KuklaError(f"--resume: {config.store} holds other rows than the store the run in {config.out} trained "
                         "on (another harvest, shuffle or holdout); resume on that store, or train into a new --out")
    if state["world"] != ranks.world:
        raise KuklaError(f"--resume: the run had {state['world']} process(es), this launch has {ranks.world}; "
                         "resume with the same number of processes")
    return state


def _restore(state: dict[str, Any], trainees: list[Trainee], stream: ActivationStream, ranks: Ranks) -> None:
    for trainee in trainees:
        saved = state["members"][trainee.name]
        trainee.dictionary.load_state_dict(saved["dictionary"])
        trainee.optimizer.load_state_dict(saved["optimizer"])
        trainee.generator.set_state(saved["generator"])
        trainee.dictionary.use_sparse_path = saved.get("sparse_path", trainee.dictionary.use_sparse_path)
        trainee.dictionary.count_dead()  # aux-k's candidates, as the checkpointed run had sized them
    stream.load_state_dict(state["streams"][ranks.rank])
    torch.set_rng_state(state["torch_rng"])
    if ranks.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"][ranks.rank] if isinstance(state["cuda_rng"], list)
                                 else state["cuda_rng"], ranks.device)


def _averaged_metrics(trainees: list[Trainee], ranks: Ranks) -> dict[str, dict[str, float]]:
    """Each member's latest figures, averaged over ranks (each rank saw different rows)."""
    local = step_metrics(trainees)
    if ranks.world == 1:
        return local
    keys = [(name, key) for name, m in local.items() for key in m]
    values = torch.tensor([local[n][k] for n, k in keys], dtype=torch.float64,
                          device=ranks.device if ranks.device.type == "cuda" else "cpu")
    values = sum_over_ranks(values, ranks) / ranks.world
    out: dict[str, dict[str, float]] = {name: {} for name in local}
    for (name, key), value in zip(keys, values.tolist()):
        out[name][key] = value
    return out


def _checkpoint(config: TrainConfig, store: Store, trainees: list[Trainee], stream: ActivationStream,
                step: int, ranks: Ranks, calibration_rows: int) -> Path | None:
    """Write a complete checkpoint on rank 0 (every rank hands over its stream cursor).

    Every rank re-sizes aux-k's candidates here, as a run resumed from this checkpoint will.
    """
    for trainee in trainees:
        trainee.dictionary.count_dead()
    streams = gather_objects(stream.state_dict(), ranks)
    cuda = gather_objects(torch.cuda.get_rng_state(ranks.device), ranks) if ranks.device.type == "cuda" else None
    path = None
    if ranks.is_main:
        if any(t.dictionary.rule.calibrated for t in trainees):
            held_out = _held_out_inputs(store, config, calibration_rows, ranks)
            for trainee in trainees:
                if trainee.dictionary.rule.calibrated:  # each member encodes every row: rows × d × width
                    batches = _counted(held_out, f"threshold calibration ({trainee.name})")
                    calibrate_threshold(trainee.dictionary, batches, per_latent=config.per_latent_thresholds,
                                        l0_cap=config.l0_cap_for(trainee.member.config))
        state = {
            "format": CHECKPOINT_FORMAT, "step": step, "world": ranks.world, "config": to_dict(config),
            "streams": streams, "torch_rng": torch.get_rng_state(), "cuda_rng": cuda,
            "store": store.identity,
            "members": {t.name: {"dictionary": t.dictionary.state_dict(), "optimizer": t.optimizer.state_dict(),
                                 "generator": t.generator.get_state(),
                                 "sparse_path": t.dictionary.use_sparse_path} for t in trainees},
        }

        calibrated = calibration_range(store, calibration_rows)

        weights = [list(t.dictionary.parameters()) for t in trainees]  # what each dictionary's folder holds

        def build(tmp: Path) -> None:
            for trainee, written in zip(trainees, weights):
                save_dictionary(trainee.dictionary, tmp / trainee.name,
                                checkpoint.dictionary_metadata(config, store, trainee, step, ranks.world, calibrated))
                bar.update(checkpoint.tensor_bytes(written))
            checkpoint.save_state(tmp, state, written=bar.update)
            bar.total = max(bar.total, bar.n)  # the pickle's own few bytes beyond its tensors': end at 100%

        with progress(checkpoint.tensor_bytes([weights, state]), f"checkpoint step {step}", unit="B") as bar:
            path = checkpoint.write_checkpoint(config.out, step, build, config.keep_checkpoints)
    barrier(ranks)
    return path


def _counted(batches: list[torch.Tensor], desc: str) -> Iterator[torch.Tensor]:
    """The batches, their rows counted on a bar as each one is consumed."""
    with progress(sum(len(b) for b in batches), desc) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))


def _held_out_inputs(store: Store, config: TrainConfig, rows: int, ranks: Ranks) -> list[torch.Tensor]:
    """Up to `rows` input rows of the store's calibration split, in training-sized batches: BatchTopK's
    inference rule is calibrated on them, and evaluate never scores them."""
    split = calibration_range(store, rows)
    if not split:
        raise KuklaError(f"store {config.store} has {store.holdout_rows} held-out rows; the BatchTopK threshold "
                         "is calibrated on the first half of them: re-finalize it with at least 2 held-out rows")
    step = min(config.batch_size, len(split))
    return [store.read(config.hooks[0], lo, min(lo + step, split.stop)).to(ranks.device)
            for lo in range(split.start, split.stop, step)]


def calibration_range(store: Store, rows: int) -> range:
    """The rows a calibration of `rows` rows reads: the start of the store's calibration split."""
    split = calibration_rows(store)
    return split[:rows]
