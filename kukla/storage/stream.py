"""ActivationStream: batches of rows for training, prefetched, split by rank, exactly resumable.

The store is already globally shuffled, so the stream reads large contiguous chunks (fast)
and only shuffles the order of chunks, afresh each epoch. Under data parallelism rank r of
world w reads rows [r·b, (r+1)·b) of every global batch of w·b rows, the global batches being
exactly those one process reading batches of w·b would get: so the world size cannot change
what is trained on. With drop_last every rank yields the same number of batches (DDP needs that). The cursor counts batches handed to the caller, not batches prefetched,
so `state_dict()` after batch i resumes at batch i + 1.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch

from kukla.errors import KuklaError
from kukla.storage.codecs import from_stored
from kukla.storage.store import Store

Split = Literal["train", "holdout", "all"]


class Batch(NamedTuple):
    """One tensor per requested hook, in order; `rows` are the store row indices if asked."""

    acts: tuple[torch.Tensor, ...]
    rows: torch.Tensor | None


def split_range(store: Store, split: Split) -> tuple[int, int]:
    """Rows [lo, hi) of a split: the held-out tail, everything before it, or all rows."""
    cut = store.n_rows - store.holdout_rows
    if split == "train":
        return 0, cut
    if split == "holdout":
        return cut, store.n_rows
    if split == "all":
        return 0, store.n_rows
    raise KuklaError(f"unknown split {split!r}: use train, holdout or all")


def batches_per_epoch(store: Store, batch_size: int, *, split: Split = "train", world: int = 1,
                      rank: int = 0, drop_last: bool = True) -> int:
    """Batches one rank gets per epoch (its shares of the global batches); with drop_last the
    same on every rank. Without it, a rank whose share of the last, partial global batch is
    empty gets one batch fewer."""
    if not 0 <= rank < world:
        raise KuklaError(f"rank {rank} is outside world size {world}")
    lo, hi = split_range(store, split)
    full, rest = divmod(hi - lo, batch_size * world)
    return full if drop_last else full + int(rest > rank * batch_size)


def rank_share(pieces: list[tuple[int, int]], batch_size: int, rank: int, world: int) -> list[tuple[int, int]]:
    """The rows of `pieces` (in order, the first starting a global batch) at positions
    [r·b, (r+1)·b) of every run of w·b: rank r's share of each global batch."""
    if world == 1:
        return pieces
    size, first = batch_size * world, rank * batch_size
    out, position = [], 0
    for lo, hi in pieces:
        end, j = position + hi - lo, position // size
        while j * size + first < end:
            a, b = max(position, j * size + first), min(end, j * size + first + batch_size)
            if a < b:
                out.append((lo + a - position, lo + b - position))
            j += 1
        position = end
    return out


class ActivationStream:
    """Iterable of `Batch`es over one or two hooks ((x,) for an SAE, (x, y) for a transcoder)."""

    def __init__(self, store: Store, hooks: Sequence[str], batch_size: int, *, split: Split = "train",
                 rank: int = 0, world: int = 1, epochs: int = 1, seed: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, prefetch: int = 4,
                 with_rows: bool = False, drop_last: bool = True) -> None:
        hooks = [h.removeprefix("acts/") for h in ([hooks] if isinstance(hooks, str) else hooks)]
        store.check_hooks(hooks)
        if batch_size <= 0 or epochs <= 0 or prefetch <= 0:
            raise KuklaError("batch_size, epochs and prefetch must be positive")
        self.store, self.hooks, self.batch_size = store, hooks, batch_size
        self.split, self.rank, self.world, self.epochs, self.seed = split, rank, world, epochs, seed
        self.device, self.dtype, self.prefetch = torch.device(device), dtype, prefetch
        self.with_rows, self.drop_last = with_rows, drop_last
        self.rows = range(*split_range(store, split))
        self.batches_per_epoch = batches_per_epoch(store, batch_size, split=split, world=world, rank=rank,
                                                   drop_last=drop_last)
        self.epoch, self.batch = 0, 0
        self.pin = self.device.type == "cuda" and torch.cuda.is_available()

    def __len__(self) -> int:
        """Batches still to come (all epochs) from the current cursor."""
        return self.batches_per_epoch * self.epochs - (self.epoch * self.batches_per_epoch + self.batch)

    def state_dict(self) -> dict[str, Any]:
        """The cursor, plus what must match for an exact resume."""
        return {"epoch": self.epoch, "batch": self.batch, "batch_size": self.batch_size, "seed": self.seed,
                "split": self.split, "rank": self.rank, "world": self.world, "hooks": self.hooks,
                "n_rows": self.store.n_rows, "fingerprint": self.store.fingerprint, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with exactly the batches that had not been handed out."""
        mine = self.state_dict()
        for key in ("batch_size", "seed", "split", "rank", "world", "hooks", "n_rows", "fingerprint", "drop_last"):
            if state.get(key) != mine[key]:
                raise KuklaError(f"stream cursor was saved with {key}={state.get(key)!r}, this stream has "
                                 f"{mine[key]!r}: resume with the same store and stream settings")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def blocks(self, epoch: int) -> list[tuple[int, int]]:
        """The split's rows cut at the store's chunk boundaries, in this epoch's (seeded) order."""
        chunk, lo, hi = self.store.chunk_rows, self.rows.start, self.rows.stop
        edges = [lo, *range((lo // chunk + 1) * chunk, hi, chunk), hi] if hi > lo else []
        blocks = list(zip(edges[:-1], edges[1:]))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(blocks))
        return [blocks[i] for i in order]

    def __iter__(self) -> Iterator[Batch]:
        if self.batch >= self.batches_per_epoch and self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(self.epoch, self.batch, out, stop), daemon=True)
        worker.start()
        try:
            while True:
                item = out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.batch += 1
                if self.batch == self.batches_per_epoch and self.epoch + 1 < self.epochs:
                    self.epoch, self.batch = self.epoch + 1, 0
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    out.get(timeout=0.05)
                except queue.Empty:
                    pass

    def _produce(self, epoch: int, batch: int, out: queue.Queue, stop: threading.Event) -> None:
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            with ThreadPoolExecutor(max_workers=min(self.prefetch, os.cpu_count() or 2)) as pool:
                for e in range(epoch, self.epochs):
                    if not self._produce_epoch(e, batch if e == epoch else 0, pool, put, stop):
                        return
            put(None)
        except BaseException as exc:  # handed to the consumer, who re-raises it
            put(exc)

    def _produce_epoch(self, epoch: int, batch: int, pool: ThreadPoolExecutor, put: Any,
                       stop: threading.Event) -> bool:
        """Read this epoch's blocks ahead (bounded), cut this rank's shares into batches from `batch` on."""
        size = self.batch_size * self.world  # the global batch
        total = len(self.rows) // size * size if self.drop_last else len(self.rows)
        skip = batch * size
        wanted: list[tuple[int, int]] = []
        position = 0
        for lo, hi in self.blocks(epoch):  # the rows of every rank still due this epoch, as (lo, hi) pieces
            a, b = max(lo, lo + skip - position), min(hi, lo + total - position)
            if a < b:
                wanted.append((a, b))
            position += hi - lo
        wanted = rank_share(wanted, self.batch_size, self.rank, self.world)
        names = [f"acts/{h}" for h in self.hooks]
        pending: list[Any] = []
        it = iter(wanted)
        for piece in it:
            pending.append(pool.submit(self._read, names, *piece))
            if len(pending) >= self.prefetch:
                break
        filled, parts = 0, []
        while pending:
            if stop.is_set():
                return False
            block, lo, hi = pending.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(self._read, names, *nxt))
            start = 0
            while start < hi - lo:
                take = min(self.batch_size - filled, hi - lo - start)
                parts.append(([x[start:start + take] for x in block], lo + start, take))
                filled, start = filled + take, start + take
                if filled == self.batch_size:
                    if not put(self._assemble(parts)):
                        return False
                    filled, parts = 0, []
        if parts and not put(self._assemble(parts)):
            return False
        return True

    def _read(self, names: list[str], lo: int, hi: int) -> tuple[list[np.ndarray], int, int]:
        return [self.store.read_stored(name, lo, hi) for name in names], lo, hi

    def _assemble(self, parts: list[tuple[list[np.ndarray], int, int]]) -> Batch:
        """One batch: decode into (pinned) tensors of the wanted dtype, then move to the device."""
        n = sum(take for *_, take in parts)
        acts = []
        for i, name in enumerate(self.hooks):
            width = self.store.hooks[name]
            x = torch.empty((n, width), dtype=self.dtype, pin_memory=self.pin)
            at = 0
            for arrays, _, take in parts:
                x[at:at + take].copy_(from_stored(arrays[i], self.store.meta["dtype"]))
                at += take
            acts.append(x.to(self.device, non_blocking=True) if self.device.type != "cpu" else x)
        rows = None
        if self.with_rows:
            rows = torch.cat([torch.arange(lo, lo + take) for _, lo, take in parts])
        return Batch(tuple(acts), rows)
