"""ActivationStream: batches of rows for training, prefetched, split by rank, exactly resumable.

The store is already globally shuffled, so the stream reads large contiguous chunks (fast)
and only shuffles the order of chunks, afresh each epoch. Under data parallelism rank r of
world w reads rows [r·b, (r+1)·b) of every global batch of w·b rows, the global batches being
exactly those one process reading batches of w·b would get: so the world size cannot change
what is trained on. With drop_last every rank yields the same number of batches (DDP needs that). The cursor counts batches handed to the caller, not batches prefetched,
so `state_dict()` after batch i resumes at batch i + 1.

Reader threads read up to `prefetch` whole batches ahead, each straight from the store's
shards into one buffer per hook in the stored dtype, so memory stays within prefetch + 2
batches whatever the store's size, and a missing or damaged chunk stops the stream with the
store's one-line error.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch

from kukla.errors import KuklaError
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
    return list(_rank_share(pieces, batch_size, rank, world))


def _rank_share(pieces: Iterable[tuple[int, int]], batch_size: int, rank: int,
                world: int) -> Iterator[tuple[int, int]]:
    """`rank_share`, one piece at a time (the stream's pieces are an epoch's chunks: made as read)."""
    if world == 1:
        yield from pieces
        return
    size, first = batch_size * world, rank * batch_size
    position = 0
    for lo, hi in pieces:
        end, j = position + hi - lo, position // size
        while j * size + first < end:
            a, b = max(position, j * size + first), min(end, j * size + first + batch_size)
            if a < b:
                yield lo + a - position, lo + b - position
            j += 1
        position = end


class ActivationStream:
    """Iterable of `Batch`es over one or two hooks ((x,) for an SAE, (x, y) for a transcoder), and
    any row-aligned `truth/<name>` array beside them (a toy source's ground truth), read alike."""

    def __init__(self, store: Store, hooks: Sequence[str], batch_size: int, *, split: Split = "train",
                 rank: int = 0, world: int = 1, epochs: int = 1, seed: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, prefetch: int = 4,
                 with_rows: bool = False, drop_last: bool = True, threads: int | None = None) -> None:
        hooks = [h.removeprefix("acts/") for h in ([hooks] if isinstance(hooks, str) else hooks)]
        store.check_hooks([h for h in hooks if not h.startswith("truth/")])
        missing = [h for h in hooks if h.startswith("truth/") and h not in store.specs]
        if missing:
            raise KuklaError(f"store {store.url} has no {missing[0]}; its truth arrays: "
                             f"{', '.join(n for n in store.specs if n.startswith('truth/')) or 'none'}")
        self.arrays = [h if h.startswith("truth/") else f"acts/{h}" for h in hooks]
        # the torch dtype each array is stored in: the store's for activations, a truth array's own
        self.stored = {name: store.dtype if name.startswith("acts/") else
                       torch.from_numpy(np.empty(0, store.specs[name].dtype)).dtype for name in self.arrays}
        if batch_size <= 0 or epochs <= 0 or prefetch <= 0 or (threads is not None and threads <= 0):
            raise KuklaError("batch_size, epochs, prefetch and threads must be positive")
        self.store, self.hooks, self.batch_size = store, hooks, batch_size
        self.split, self.rank, self.world, self.epochs, self.seed = split, rank, world, epochs, seed
        self.device, self.dtype, self.prefetch = torch.device(device), dtype, prefetch
        self.with_rows, self.drop_last = with_rows, drop_last
        self.threads = threads or min(prefetch, os.cpu_count() or 2)
        self.rows = range(*split_range(store, split))
        self.batches_per_epoch = batches_per_epoch(store, batch_size, split=split, world=world, rank=rank,
                                                   drop_last=drop_last)
        self.epoch, self.batch = 0, 0
        self.pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._staging = threading.local()

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

    def blocks(self, epoch: int) -> Iterator[tuple[int, int]]:
        """The split's rows cut at the store's chunk boundaries, in this epoch's (seeded) order,
        made as they are read: the epoch holds its order (8 bytes a chunk), not a list of ranges
        (~0.5 byte a row at 512-row chunks: 0.5 GB an epoch at 10⁹ rows)."""
        chunk, lo, hi = self.store.chunk_rows, self.rows.start, self.rows.stop
        inner = range((lo // chunk + 1) * chunk, hi, chunk)  # the chunk boundaries inside the split
        n = 1 + len(inner) if hi > lo else 0
        for i in np.random.default_rng([self.seed, epoch]).permutation(n):
            yield (lo if i == 0 else inner[i - 1]), (hi if i == n - 1 else inner[i])

    def __iter__(self) -> Iterator[Batch]:
        if self.batch >= self.batches_per_epoch and self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        out: queue.Queue = queue.Queue(maxsize=1)
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
        """Keep `prefetch` batches being read by the pool, hand them over in order."""
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        pool = ThreadPoolExecutor(max_workers=self.threads)
        try:
            pending: deque[Future] = deque()
            for e in range(epoch, self.epochs):
                for pieces in self._batch_pieces(e, batch if e == epoch else 0):
                    pending.append(pool.submit(self._read_batch, pieces))
                    if len(pending) >= self.prefetch and not put(pending.popleft().result()):
                        return
            while pending:
                if not put(pending.popleft().result()):
                    return
            put(None)
        except BaseException as exc:  # handed to the consumer, who re-raises it
            put(exc)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _batch_pieces(self, epoch: int, batch: int) -> Iterator[list[tuple[int, int]]]:
        """This rank's batches of this epoch from `batch` on, each as the (lo, hi) row ranges it
        is cut from: its shares of the global batches of batch_size · world rows."""
        size = self.batch_size * self.world  # the global batch
        total = len(self.rows) // size * size if self.drop_last else len(self.rows)
        skip = batch * size

        def wanted() -> Iterator[tuple[int, int]]:  # the rows of every rank still due this epoch, as pieces
            position = 0
            for lo, hi in self.blocks(epoch):
                a, b = max(lo, lo + skip - position), min(hi, lo + total - position)
                if a < b:
                    yield a, b
                position += hi - lo

        filled, pieces = 0, []
        for a, b in _rank_share(wanted(), self.batch_size, self.rank, self.world):
            while a < b:
                take = min(self.batch_size - filled, b - a)
                pieces.append((a, a + take))
                filled, a = filled + take, a + take
                if filled == self.batch_size:
                    yield pieces
                    filled, pieces = 0, []
        if pieces:
            yield pieces

    def _read_batch(self, pieces: list[tuple[int, int]]) -> Batch:
        """One batch read straight into (pinned) buffers of the stored dtype, then moved to the
        device and converted there: bf16 crosses the bus at half the bytes of float32."""
        n = sum(hi - lo for lo, hi in pieces)
        acts = []
        for name in self.arrays:
            spec = self.store.specs[name]
            buf = self._buffer(spec.name, n, spec.row_shape, self.stored[name])
            view = buf.view(torch.uint8).numpy().view(spec.dtype)
            at = 0
            for lo, hi in pieces:
                self.store.read_into(spec.name, lo, hi, view[at:at + hi - lo])
                at += hi - lo
            if self.device.type != "cpu":
                buf = buf.to(self.device, non_blocking=True)
                acts.append(buf if buf.dtype == self.dtype else buf.to(self.dtype))
            else:
                acts.append(buf if buf.dtype == self.dtype else host_empty(buf.shape, self.dtype).copy_(buf))
        rows = torch.cat([torch.arange(lo, hi) for lo, hi in pieces]) if self.with_rows else None
        return Batch(tuple(acts), rows)

    def _buffer(self, name: str, n: int, row_shape: tuple[int, ...], stored: torch.dtype) -> torch.Tensor:
        """Where a batch's stored rows land. A CPU batch converted to another dtype leaves its
        buffer free, so each reader thread keeps one per hook (no page faults per batch); pinned
        buffers come from torch's caching host allocator, which waits for their copy to finish."""
        if self.device.type != "cpu":
            return torch.empty((n, *row_shape), dtype=stored, pin_memory=self.pin)
        if self.dtype == stored:
            return host_empty((n, *row_shape), stored)
        buffers = self._staging.__dict__
        if name not in buffers:
            buffers[name] = host_empty((self.batch_size, *row_shape), stored)
        return buffers[name][:n]


def host_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor in memory from numpy's allocator: glibc hands a freed batch's pages to the next
    one, where torch maps and faults in fresh pages for each (1.5-2x the cost of a bf16 batch here)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = np.empty((*shape[:-1], shape[-1] * itemsize) if shape else (itemsize,), np.uint8)
    return torch.from_numpy(raw).view(dtype).reshape(tuple(shape))
