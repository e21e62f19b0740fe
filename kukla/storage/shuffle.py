"""The global shuffle's two passes under a memory budget (`finalize` plans and commits them).

Pass 1 (scatter) reads the written rows in runs that fit the budget, sends each row to a
uniformly random bucket, and writes each run sorted by bucket (raw bytes, one file per
array, a CRC32C per bucket piece), so a bucket's rows are one byte range per run. Pass 2
(permute) builds each final shard from the buckets that cover its rows: bucket b's rows, in
the order of a seeded uniform permutation, fill rows [start of b, end of b) of the final
arrays. Random buckets and a uniform permutation inside each give a uniform permutation of all
rows; the same seed gives the same store, byte for byte. Runs are scratch written once and read
once, and shards are read once per epoch, so on a local disk both bypass the page cache
(O_DIRECT), and every row buffer is reused: copying into fresh pages (cache or anonymous) cost
more CPU than everything else together.

Every unit of work (a run, a shard) is a pure function of the plan, written atomically and
committed by one small object carrying the plan's id, so a unit is done once however many
workers try it (doing a unit twice is harmless: same bytes). A run piece whose checksum fails
is never used.
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from functools import cache, lru_cache, partial
from typing import Any, Callable

import numpy as np

from kukla.errors import KuklaError, preemption_point
from kukla.progress import progress
from kukla.storage.format import ArraySpec, Attributes, array_specs, numcodecs_codec, shard_key
from kukla.storage.location import DIRECT_ALIGN, Location, aligned, aligned_buffer
from kukla.storage.part import SegmentTable, read_blob, segment_dir
from kukla.storage.shards import Layout, crc32c, encode_shard


def _specs(attrs: dict[str, Any], plan: dict[str, Any]) -> list[ArraySpec]:
    return array_specs({**attrs, "truth": plan["truth"]})


def array_layouts(attrs: dict[str, Any], plan: dict[str, Any]) -> list[Layout]:
    """Where each final array's rows go under the plan: its shards, chunks and codec."""
    codec = numcodecs_codec(attrs["codec"])
    return [Layout(spec, plan["n_rows"], attrs["chunk_rows"], plan["shard_rows"], codec) for spec in _specs(attrs, plan)]


def _run_key(k: int) -> str:
    return f"_finalize/runs/run-{k:06d}"


def _committed(location: Location, key: str, plan: dict[str, Any]) -> dict[str, Any] | None:
    """A unit's commit record, if it was committed under this plan."""
    try:
        record = location.read_json(key)
    except (FileNotFoundError, ValueError):
        return None
    return record if record.get("plan") == plan["id"] else None


def _unit(location: Location, done: str, plan: dict[str, Any], write: Callable[[], None]) -> None:
    """Do one unit (`write`, which commits it at `done`) unless it is committed. A unit that fails
    but is committed by now was done by another process, whose commit may have removed what this
    one read (`_parts/` once pass 1 is done, the temporaries once every unit is): this process
    stalled past its lease, so the commit did not wait for it. Its failure is then moot."""
    if _committed(location, done, plan) is not None:
        return
    try:
        write()
    except (FileNotFoundError, KuklaError):
        if _committed(location, done, plan) is None:
            raise


def _share(n: int, worker: int, workers: int) -> list[int]:
    """Units 0..n-1 in the order a worker takes them: its own contiguous share, then the rest."""
    lo, hi = worker * n // workers, (worker + 1) * n // workers
    return [*range(lo, hi), *range(hi, n), *range(lo)]


def scatter(location: Location, plan: dict[str, Any], worker: int, workers: int) -> None:
    """Pass 1: each run's rows, sorted by a uniformly random bucket, one raw file per array."""
    attrs = Attributes.read(location).value
    specs, n_rows, run_rows = _specs(attrs, plan), plan["n_rows"], plan["run_rows"]
    n_runs = math.ceil(n_rows / run_rows)
    segments, buffers = cache(partial(_segments, location, attrs, plan)), _Buffers()  # read only if a run needs them
    with progress(n_rows, f"shuffle 1/2 scatter{_label(worker, workers)}") as bar:
        for k in _share(n_runs, worker, workers):
            preemption_point()
            lo, hi = k * run_rows, min(n_rows, (k + 1) * run_rows)
            _unit(location, _run_key(k) + ".json", plan,
                  partial(_scatter_run, location, plan, specs, segments, k, lo, hi, buffers))
            bar.update(hi - lo)


def _segments(location: Location, attrs: dict[str, Any], plan: dict[str, Any]) -> SegmentTable:
    """The written segments pass 1 reads: every row the plan counted, or none of them is used."""
    table = SegmentTable.read(location, attrs["world"], attrs["codec"])
    if table.n_rows != plan["n_rows"]:
        raise KuklaError(f"{location.url}: the written parts hold {table.n_rows} rows, not the {plan['n_rows']} "
                         "finalize planned (_parts/ was changed or removed): rebuild the store")
    return table


def _scatter_run(location: Location, plan: dict[str, Any], specs: list[ArraySpec],
                 segments: Callable[[], SegmentTable], k: int, lo: int, hi: int, buffers: _Buffers) -> None:
    table = segments()
    buckets = np.random.default_rng([plan["seed"], 1, k]).integers(0, plan["n_buckets"], hi - lo)
    order = np.argsort(buckets, kind="stable")
    where = np.empty_like(order)
    where[order] = np.arange(hi - lo)  # each row's place in the sorted run
    counts = np.bincount(buckets, minlength=plan["n_buckets"])
    edges = np.concatenate([[0], np.cumsum(counts)])
    crcs, largest = {}, max(int(e["rows"]) for e in table.entries)
    for spec in specs:
        size = (hi - lo) * spec.row_bytes
        run = buffers.raw("run", aligned(min(plan["run_rows"], plan["n_rows"]) * spec.row_bytes))
        data = run[:size].view(spec.dtype).reshape(hi - lo, *spec.row_shape)
        offset = 0
        for entry in table.entries:  # segment by segment, each read into one reused buffer: no joined copy
            rows = int(entry["rows"])
            a, b = max(lo, offset), min(hi, offset + rows)
            if a < b:
                key = f"{segment_dir(int(entry['rank']), int(entry['segment']))}/{spec.name}.bin"
                segment = read_blob(location, key, entry["arrays"][spec.name], table.codec,
                                    buffers.raw("segment", largest * spec.row_bytes))
                data[where[a - lo:b - lo]] = segment[a - offset:b - offset]
            offset += rows
        crcs[spec.name] = [crc32c(data[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        location.put_direct(f"{_run_key(k)}/{spec.name}.bin", run, size)
    location.put_json(_run_key(k) + ".json", {"plan": plan["id"], "counts": counts.tolist(), "crc32c": crcs})


class _Buffers:
    """Scratch rows kept from one run, segment, shard or bucket to the next: a fresh page costs a
    fault and a zeroing pass (on a VM more than the copy into it), a reused one nothing. Every
    buffer is page-aligned, so runs go to and from the disk past the page cache (O_DIRECT)."""

    def __init__(self) -> None:
        self.bytes: dict[str, np.ndarray] = {}

    def raw(self, name: str, size: int) -> np.ndarray:
        """`size` bytes of buffer `name`, grown when too small."""
        buf = self.bytes.get(name)
        if buf is None or buf.size < size:
            buf = self.bytes[name] = aligned_buffer(size)
        return buf[:size]

    def rows(self, name: str, n: int, spec: ArraySpec) -> np.ndarray:
        """`n` rows of `spec` in buffer `name` (shared by all arrays)."""
        return self.raw(name, n * spec.row_bytes).view(spec.dtype).reshape(n, *spec.row_shape)


def permute(location: Location, plan: dict[str, Any], worker: int, workers: int) -> None:
    """Pass 2: each final shard from the buckets covering its rows, each bucket uniformly permuted."""
    attrs = Attributes.read(location).value
    layouts, n_rows = array_layouts(attrs, plan), plan["n_rows"]
    runs = _Runs(location, plan, [layout.spec.name for layout in layouts])
    n_shards = layouts[0].n_shards if layouts else 0
    with progress(n_rows, f"shuffle 2/2 permute{_label(worker, workers)}") as bar:
        try:
            for s in _share(n_shards, worker, workers):
                preemption_point()
                lo, hi = layouts[0].shard_range(s)
                done = f"_finalize/shards/shard-{s:09d}.json"
                _unit(location, done, plan, partial(_permute_shard, location, plan, layouts, runs, s, lo, hi, done))
                bar.update(hi - lo)
        finally:
            runs.close()


def _permute_shard(location: Location, plan: dict[str, Any], layouts: list[Layout], runs: _Runs, s: int, lo: int,
                   hi: int, done: str) -> None:
    """Final shard `s` (rows [lo, hi)) of every array, then its commit at `done`."""
    for layout in layouts:
        _put_shard(location, shard_key(layout.spec, s), encode_shard(layout, runs.rows(layout, lo, hi)), runs.buffers)
    location.put_json(done, {"plan": plan["id"]})


def _put_shard(location: Location, key: str, pieces: list[np.ndarray], buffers: _Buffers) -> None:
    """One shard, its pieces joined in a reused aligned buffer and written past the page cache
    (O_DIRECT): the copy into warm memory costs a fraction of a write into fresh cache pages, and
    a store is read once per epoch, mostly from disk at scale."""
    size = sum(piece.nbytes for piece in pieces)
    image, at = buffers.raw("image", aligned(size)), 0
    for piece in pieces:
        image[at:at + piece.nbytes] = piece
        at += piece.nbytes
    location.put_direct(key, image, size)


class _Runs:
    """Final rows [lo, hi) gathered from the committed runs, one checked bucket in memory at a time.

    Where bucket b lies in run k (its first row and rows there) and the CRC32C of that piece per
    array: n_runs · n_buckets = 32 · (rows · row_bytes / budget)² entries, so held whole they grow
    with the square of the store (1.5·10⁸ at 10⁹ Gemma-2-2B rows under 2 GiB: 25 GB as the
    commits' Python lists, 4 GB as uint32 arrays). They go from the commits, read once and one at a
    time, into an unlinked scratch file (beside the runs on a local store, else in the temporary
    folder) of `pieces` entries, 8 + 4 · arrays bytes each (16 + 4 · arrays past 2³² rows a run),
    read back a block of buckets at a time within 1/16 of the budget: pass 2 walks buckets in order."""

    def __init__(self, location: Location, plan: dict[str, Any], names: list[str]) -> None:
        self.location, self.plan, self.names = location, plan, names
        self.n_runs = math.ceil(plan["n_rows"] / plan["run_rows"]) if plan["n_rows"] else 0
        self.n_buckets = n_buckets = plan["n_buckets"]
        count = np.uint32 if plan["run_rows"] < 2**32 else np.uint64
        self.pieces = np.dtype([("start", count), ("rows", count), ("crc32c", "<u4", (len(names),))])
        self.sizes = np.zeros(n_buckets, np.int64)  # rows of each bucket, over all runs
        self.scratch = tempfile.TemporaryFile(dir=location.join("_finalize") if location.is_local else None)
        for k in range(self.n_runs):
            record = _committed(location, _run_key(k) + ".json", plan)
            if record is None:
                raise KuklaError(f"{location.url}: shuffle run {k} is not committed: rerun `kukla store finalize "
                                 f"{location.url}` to redo it")
            row = np.empty(n_buckets, self.pieces)
            row["rows"] = counts = np.asarray(record["counts"], np.int64)
            row["start"] = np.cumsum(counts) - counts  # where bucket b starts inside run k
            row["crc32c"] = np.asarray([record["crc32c"][name] for name in names], np.uint32).T.reshape(
                n_buckets, len(names))
            self.scratch.write(row.tobytes())
            self.sizes += counts
        self.scratch.flush()
        self.bucket_end = np.cumsum(self.sizes)
        self.largest = int(self.sizes.max(initial=0))  # bucket buffers never regrow
        budget = int(plan.get("memory_budget", 2 << 30))
        self.block_buckets = max(1, budget // 16 // max(1, self.n_runs * self.pieces.itemsize))
        self.block_start, self.block = 0, np.empty((self.n_runs, 0), self.pieces)
        self.loaded: dict[str, int] = {}  # the bucket each array's bucket buffer holds
        self.buffers = _Buffers()

    def close(self) -> None:
        self.scratch.close()

    def pieces_of(self, b: int) -> np.ndarray:
        """Bucket b's piece in every run ([n_runs] of `pieces`), from the block of buckets held."""
        if not self.block_start <= b < self.block_start + self.block.shape[1]:
            hi = min(self.n_buckets, b + self.block_buckets)
            raw = np.empty((self.n_runs, (hi - b) * self.pieces.itemsize), np.uint8)
            for k in range(self.n_runs):  # run k's entries for buckets [b, hi): one read
                os.preadv(self.scratch.fileno(), [raw[k]], (k * self.n_buckets + b) * self.pieces.itemsize)
            self.block_start, self.block = b, raw.view(self.pieces)
        return self.block[:, b - self.block_start]

    def rows(self, layout: Layout, lo: int, hi: int) -> np.ndarray:
        """Final rows [lo, hi) of one array, gathered straight into a buffer reused across shards."""
        spec = layout.spec
        out = self.buffers.rows("shard", min(layout.shard_rows, layout.n_rows), spec)[:hi - lo]
        first = int(np.searchsorted(self.bucket_end, lo, side="right"))
        last = int(np.searchsorted(self.bucket_end, hi - 1, side="right"))
        for b in range(first, last + 1):
            size = int(self.sizes[b])
            start = int(self.bucket_end[b]) - size
            if self.loaded.get(spec.name) != b:
                self._bucket(spec, b, size)
            a, z = max(lo, start), min(hi, start + size)
            perm = _bucket_permutation(self.plan["seed"], b, size)
            np.take(self._bucket_rows(spec)[:size], perm[a - start:z - start], axis=0, out=out[a - lo:z - lo],
                    mode="clip")  # "raise" would gather into a temporary first
        return out

    def _bucket_rows(self, spec: ArraySpec) -> np.ndarray:
        """One array's bucket buffer, sized once for the largest bucket."""
        return self.buffers.rows(f"bucket {spec.name}", self.largest, spec)

    def _bucket(self, spec: ArraySpec, b: int, size: int) -> None:
        """Load bucket b of one array, unpermuted, into its buffer: one checked byte range from each run."""
        self.loaded.pop(spec.name, None)
        flat, at = self._bucket_rows(spec)[:size].reshape(-1).view(np.uint8), 0
        pieces, column = self.pieces_of(b), self.names.index(spec.name)
        for k in np.flatnonzero(pieces["rows"]):
            n = int(pieces["rows"][k]) * spec.row_bytes
            start = int(pieces["start"][k]) * spec.row_bytes
            key = f"{_run_key(int(k))}/{spec.name}.bin"
            piece = flat[at:at + n]
            if _read_into(self.location, key, start, piece, self.buffers) != n or (
                    crc32c(piece) != int(pieces["crc32c"][k, column])):
                raise KuklaError(f"{self.location.join(key)} is damaged (checksum mismatch in bucket {b}): finalize "
                                 "cannot use it; delete that run's .json beside it and rerun finalize if "
                                 "_parts/ is still in the store, otherwise rebuild the store")
            at += n
        self.loaded[spec.name] = b


@lru_cache(maxsize=4)
def _bucket_permutation(seed: int, b: int, size: int) -> np.ndarray:
    """Bucket b's seeded order, drawn once for all arrays of the shards it covers, not once per array."""
    perm = np.random.default_rng([seed, 2, b]).permutation(size)
    perm.flags.writeable = False
    return perm


def _read_into(location: Location, key: str, start: int, out: np.ndarray, buffers: _Buffers) -> int:
    """Bytes [start, start + len(out)) of one run file into `out`; the count read. Local runs are
    read past the page cache (O_DIRECT) where the file system allows."""
    if not location.is_local:
        data = location.read_range(key, start, start + len(out))
        out[:len(data)] = np.frombuffer(data, np.uint8)
        return len(data)
    path = location.join(key)
    if hasattr(os, "O_DIRECT"):
        try:
            return _read_direct(path, start, out, buffers)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # a file system without O_DIRECT: through the page cache
                raise
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [out], start)
    finally:
        os.close(fd)


def _read_direct(path: str, start: int, out: np.ndarray, buffers: _Buffers) -> int:
    """`_read_into` with O_DIRECT: the aligned span around the bytes into a staging buffer."""
    first = start // DIRECT_ALIGN * DIRECT_ALIGN
    staging = buffers.raw("staging", aligned(start + len(out)) - first)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = max(0, min(len(out), os.preadv(fd, [staging], first) - (start - first)))
    finally:
        os.close(fd)
    out[:got] = staging[start - first:start - first + got]
    return got


def _label(worker: int, workers: int) -> str:
    return f" (worker {worker}/{workers})" if workers > 1 else ""
