"""The harvest run: the plan (which rows each rank stores) and the resumable loop that fills it.

The plan is fixed before any forward pass. Windows come in dataset order; consecutive runs of
`segment_windows` windows form segment 0, 1, 2, …; rank r of world w owns the segments s with
s mod w = r. The token budget is cut on the *planned* rows (kept positions, known from
tokenization alone), in window order, trimming the last window, so the cut is the same on every
rank, on every resume, and on every device. Rows dropped later as norm outliers are counted,
not replaced, so the plan never depends on floating-point results.

The loop: plan → (skip committed) → forward → write segment → finish → finalize. Every rank
walks the whole plan in the same order (tokenizing is cheap next to the forward pass) and runs
the model only on the segments it owns and has not committed yet, so a rerun after a crash
continues where the journal says, and the union of all ranks' segments is exactly the planned
set of rows. A background thread (`SegmentCommitter`) encodes and commits segment i while the
model runs segment i+1.

Its queue is bounded (`depth` segments waiting, one being written, one being filled by the
forward), so host memory stays a few segments whatever the store's size. The writer thread's
first error (a full disk is already a one-line `KuklaError` from the store) stops it; the main
thread raises that same error at its next `submit` or at `close`. Segments committed before it
stay committed, so a rerun resumes after them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformer_lens import HookedTransformer

from kukla.config import usable_device
from kukla.errors import KuklaError, preemption_point, stop_on_sigterm
from kukla.pipeline.harvest.config import HarvestConfig
from kukla.pipeline.harvest.forward import SegmentForward
from kukla.pipeline.massive import MASSIVE_RULE, reference_median
from kukla.pipeline.text import Window, dataset_spec, iter_texts, iter_windows, local_path, special_token_policy
from kukla.pipeline.hooks import resolve_hooks, short_form
from kukla.pipeline.models import load_model, model_summary
from kukla.pipeline.toy import TOY_HOOK, ToyTree, toy_metadata, toy_segment_rows
from kukla.progress import progress
from kukla.storage import StoreWriter, finalize_store, unfinished_ranks
from kukla.storage.finalize import check_memory_budget, check_shuffle_as_asked
from kukla.storage.location import Location, check_output_dir
from kukla.storage.part import Rows, run_state

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """A committed unit of work: consecutive windows, owned by one rank."""

    id: int
    """Position in the plan; rank r of world w owns the ids with id mod w = r."""
    planned_rows: int
    """Rows the plan puts in this segment (before any outlier drop)."""
    windows: tuple[Window, ...] = ()
    """The context windows it covers (none for generated sources such as the toy tree)."""


def cut_budget(windows: Iterable[Window], tokens: int) -> Iterator[Window]:
    """Windows until `tokens` kept positions are covered; the last window's mask is trimmed."""
    left = tokens
    for window in windows:
        kept = int(window.keep.sum())
        if kept >= left:
            keep = window.keep.copy()
            keep[np.flatnonzero(keep)[left:]] = False
            yield Window(window.index, window.tokens, keep)
            return
        left -= kept
        yield window


def plan_segments(windows: Iterable[Window], segment_windows: int) -> Iterator[Segment]:
    """Group windows into segments in order (the last may be short)."""
    batch: list[Window] = []
    segment_id = 0
    for window in windows:
        batch.append(window)
        if len(batch) == segment_windows:
            yield _segment(segment_id, batch)
            segment_id, batch = segment_id + 1, []
    if batch:
        yield _segment(segment_id, batch)


def _segment(segment_id: int, windows: list[Window]) -> Segment:
    return Segment(segment_id, int(sum(w.keep.sum() for w in windows)), tuple(windows))


def owned(segment_id: int, rank: int, world: int) -> bool:
    """Whether rank `rank` of `world` harvests this segment (round-robin keeps ranks balanced)."""
    return segment_id % world == rank


def harvest(config: HarvestConfig, *, model: HookedTransformer | None = None) -> str:
    """Write the store `config.output`; finalized on rank 0 when every rank is done.

    `model` skips loading (a model already in memory, e.g. one built from a
    `HookedTransformerConfig`); `config.model` is then only recorded as its name.
    Returns the store's path. SIGTERM abandons the segment in flight, releases the part's
    lease and raises `Preempted` (the CLI exits 143); a rerun resumes from the journal.
    """
    check_memory_budget(config.memory_budget)
    check_output_dir(config.output, "output")  # before the model loads
    with stop_on_sigterm():
        return _harvest(config, model)


def _harvest(config: HarvestConfig, model: HookedTransformer | None) -> str:
    if config.source == "toy-tree":
        meta, statics, segments = _toy_plan(config)
    else:
        meta, statics, segments = _model_plan(config, model)
    location = Location(config.output)
    state = None if config.overwrite else run_state(location, meta, dtype=config.store_dtype, world=config.world)
    if state in (None, "writing"):
        _write_part(config, meta, statics, segments)
    else:  # a rerun after every rank finished writing (a retried job): what is left is finalize's
        check_shuffle_as_asked(location, config.seed, config.holdout_rows)  # on every rank, as rank 0's finalize
        logger.info("%s: this harvest's rows are all written (%s): kept", config.output, state)
    if config.finalize and config.rank == 0:
        _finalize_when_ready(config)
    return config.output


def _write_part(config: HarvestConfig, meta: dict[str, Any], statics: dict[str, np.ndarray],
                segments: SegmentWork) -> None:
    """This rank's part of the store, finished; the writer is gone when finalize starts, which
    reads every rank's journal itself."""
    with StoreWriter.open(config.output, meta, rank=config.rank, world=config.world,
                          overwrite=config.overwrite, dtype=config.store_dtype) as writer:  # names a full disk
        for name, array in statics.items():
            writer.put_static(name, array)
        planned, dropped = _write_owned_segments(writer, segments, config)
        writer.put_static(f"harvest_rows_rank_{config.rank:05d}", np.array([planned, dropped], dtype=np.int64))
        writer.finish()


def _write_owned_segments(writer: StoreWriter, segments: SegmentWork, config: HarvestConfig) -> tuple[int, int]:
    """Harvest this rank's uncommitted segments; (planned rows, rows dropped as outliers) of the rank.

    The forward of segment i+1 runs while the writer thread commits segment i. Only the ids and
    planned rows of the rank's segments are kept, not the segments: a segment holds its windows
    (token ids and masks, ~16 bytes a row), which would grow with the store."""
    mine: list[int] = []
    planned = every_rank = 0
    bar = progress(-(-config.tokens // config.world), f"harvest rank {config.rank}/{config.world}")
    try:
        with SegmentCommitter(writer) as committer:
            for segment, make_rows in segments:
                preemption_point()
                every_rank += segment.planned_rows
                if not owned(segment.id, config.rank, config.world):
                    continue
                mine.append(segment.id)
                planned += segment.planned_rows
                if segment.id not in writer.committed:
                    committer.submit(segment.id, make_rows())  # the one place a segment is committed
                bar.set_postfix_str(f"{committer.stored_bytes / 1e9:.3f} GB written", refresh=False)
                bar.update(segment.planned_rows)
    finally:
        bar.close()
    if every_rank < config.tokens:
        logger.warning("the dataset ran out after %d of the %d tokens asked for", every_rank, config.tokens)
    return planned, planned - sum(int(writer.journal[s]["rows"]) for s in mine)


SegmentWork = Iterator[tuple[Segment, Callable[[], Callable[[], Any]]]]
"""(segment, make): `make()` starts the segment's work in the main thread (the forward) and
returns what the writer thread calls for the rows."""


def _model_plan(config: HarvestConfig, model: HookedTransformer | None) -> tuple[dict, dict, SegmentWork]:
    device = usable_device(config.device) if model is None else config.device  # first: the cheapest check
    text = config.dataset
    texts = iter_texts(text.name, text.subset, text.split, text.revision, text.text_column)
    first_text = next(texts, None)  # opens the dataset and checks its column before the model loads
    model = model if model is not None else load_model(config.model, device=device, dtype=config.model_dtype)
    if config.context_size > model.cfg.n_ctx:
        raise KuklaError(f"context_size {config.context_size} is above the model's n_ctx {model.cfg.n_ctx}; "
                         f"pass --context-size {model.cfg.n_ctx} or less")
    if model.tokenizer is None:
        raise KuklaError("the model has no tokenizer; kukla needs one to turn text into windows")
    widths = resolve_hooks(model, config.hook)
    hooks = list(widths)
    forward = SegmentForward(model, widths, batch_size=config.batch_size, store_dtype=config.store_dtype)
    spec = dataset_spec(text.name, text.subset, text.split, text.revision, text.text_column)
    windows = iter_windows(itertools.chain([] if first_text is None else [first_text], texts), model.tokenizer,
                           config.context_size, keep_special_tokens=config.keep_special_tokens)
    first = next(windows, None)  # a text that tokenizes to no window is refused before any store exists
    if first is None:
        raise KuklaError(f"dataset {text.name!r} holds no text in column {text.text_column!r}")
    segments = plan_segments(cut_budget(itertools.chain([first], windows), config.tokens), config.segment_windows)
    folder, file = local_path(config.model), local_path(text.name)
    where = {name: str(path) for name, path in (("model", folder), ("dataset", file)) if path is not None}
    meta = _common_meta(config) | {
        "source": "model",
        "model": {**model_summary(model), "name": config.model if folder is None else folder.name},
        "dataset": spec,
        "where": where,  # the paths, kept out of the fingerprint: other hosts' mounts of the same inputs
        "special_tokens": special_token_policy(model.tokenizer, config.keep_special_tokens),
        "hooks": widths,
        "hook_short_forms": {h: short_form(h) for h in hooks},
        "outliers": {"factor": config.outlier_factor, "rule": "norm at any hook > factor × segment median"},
        "massive": None if config.massive_ratio is None else {"ratio": config.massive_ratio, "rule": MASSIVE_RULE,
                                                              "array": "tokens/massive"},
    }
    reference: list[np.ndarray] = []  # the massive-activation medians, once known

    def start(segment: Segment, first_segment: Segment) -> Callable[[], Any]:
        pending = forward(segment)
        if config.massive_ratio is not None and not reference:
            if segment.id == first_segment.id:
                pending.wait()  # once per run: the reference is this segment's own norms
                reference.append(reference_median(pending.norms.numpy()))
            else:  # segment 0 is another rank's or already committed: forward it for its norms
                reference.append(reference_median(forward.norms(first_segment)))
        return functools.partial(pending.rows, outlier_factor=config.outlier_factor,
                                 massive_median=reference[0] if reference else None,
                                 massive_ratio=config.massive_ratio)

    def work() -> SegmentWork:
        first_segment = None
        for segment in segments:
            first_segment = first_segment or segment
            yield segment, functools.partial(start, segment, first_segment)

    return meta, {}, work()


def _toy_plan(config: HarvestConfig) -> tuple[dict, dict, SegmentWork]:
    params = {**dataclasses.asdict(config.toy), "seed": config.seed}
    branching = params.pop("tree")
    tree = ToyTree.build(branching, **params)
    meta = _common_meta(config) | {
        "source": "toy-tree",
        "toy": toy_metadata(branching, **params, n_features=tree.n_features),
        "hooks": {TOY_HOOK: config.toy.dim},
    }
    rows_per_segment = config.segment_windows * config.context_size

    def work() -> SegmentWork:
        for segment_id, start in enumerate(range(0, config.tokens, rows_per_segment)):
            n = min(rows_per_segment, config.tokens - start)
            yield Segment(segment_id, n), functools.partial(_ready, toy_segment_rows, tree, segment_id, n, config.seed)

    return meta, tree.statics(), work()


def _ready(make: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """Make the rows now (in the main thread); the writer thread just takes them."""
    rows = make(*args)
    return lambda: rows


def _common_meta(config: HarvestConfig) -> dict[str, Any]:
    """What every harvest records: the plan's inputs, so a rerun can prove it is the same run."""
    return {
        "planned_tokens": config.tokens,
        "context_size": config.context_size,
        "segment_windows": config.segment_windows,
        "harvest": {"keep_special_tokens": config.keep_special_tokens,
                    "rows_per_rank": "static/harvest_rows_rank_RRRRR = [planned rows, dropped outliers]"},
    }


def _finalize_when_ready(config: HarvestConfig) -> None:
    """Rank 0 polls until every rank's part is finished, then shuffles and merges them."""
    deadline = time.monotonic() + config.finalize_wait
    waiting = unfinished_ranks(config.output)
    if waiting:
        logger.info("rank 0: waiting for rank(s) %s to finish before finalizing (up to %.0f s; or stop here "
                    "and run `kukla store finalize %s` later)", ", ".join(map(str, waiting)), config.finalize_wait,
                    config.output)
    while waiting:
        if time.monotonic() > deadline:
            raise KuklaError(f"gave up waiting for rank(s) {', '.join(map(str, waiting))} after "
                             f"{config.finalize_wait:.0f} s; once they finish, run: kukla store finalize {config.output}")
        time.sleep(2.0)
        waiting = unfinished_ranks(config.output)
    finalize_store(config.output, memory_budget_bytes=config.memory_budget, seed=config.seed,
                   holdout_rows=config.holdout_rows)


class SegmentCommitter:
    """`submit(segment, rows)`: `rows()` runs in the writer thread, then `write_segment` commits it."""

    def __init__(self, writer: StoreWriter, depth: int = 1) -> None:
        self.writer = writer
        self.stored_bytes = 0
        """Uncompressed bytes committed so far, as the store holds them."""
        self._queue: queue.Queue[tuple[int, Callable[[], Rows]] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kukla-segment-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining, so a blocked submit wakes up and sees the error
            segment, rows = item
            try:
                arrays = self.writer.write_segment(segment, rows())["arrays"].values()
                self.stored_bytes += sum(int(np.prod(a["shape"])) * np.dtype(a["dtype"]).itemsize for a in arrays)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, segment: int, rows: Callable[[], Rows]) -> None:
        """Queue a segment for commit (blocks while the queue is full)."""
        self._raise()
        self._queue.put((segment, rows))

    def close(self) -> None:
        """Commit what is queued, stop the thread, and raise its error if it had one."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def __enter__(self) -> "SegmentCommitter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: commit the finished segments, but keep the first error
            self.close()
        except BaseException:  # noqa: BLE001
            pass
