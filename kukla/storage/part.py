"""One rank's part of a store being written: its layout, journal and segment blobs, the
StoreWriter that writes it, and the readers finalize, the shuffle and the store read parts back with.

A segment's data goes to `_parts/rank-R/seg-S/<array>.bin` (one compressed object per array,
transient: the shuffle turns them into the final sharded Zarr arrays); only after it is durable
does `_parts/rank-R/journal/seg-S.json` appear. The journal entry is the commit: a segment without
one never happened, and is simply rewritten on resume. Every planned segment is written once:
`committed` tells a resumed harvest what to skip. The part's writer holds a lease on
`_parts/rank-R/lock.json` (a lease, kukla.storage.location).
"""

from __future__ import annotations

import json
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np
import zarr

from kukla.config import StoreDtype, coerce
from kukla.errors import KuklaError
from kukla.storage.format import (DEFAULT_CODEC, OPTIONAL_TOKEN_ARRAYS, RESERVED, STORED_NUMPY, TOKEN_ARRAYS,
                                  Attributes, ArraySpec, HookStats, as_numpy, check_codec, check_meta, chunk_rows_for,
                                  data_crc32, meta_fingerprint, new_attributes, numcodecs_codec, to_stored,
                                  write_manifest)
from kukla.storage.location import Lease, Location, disk_full_error

if TYPE_CHECKING:
    import torch

Rows = Mapping[str, "np.ndarray | torch.Tensor"]


def part_dir(rank: int) -> str:
    return f"_parts/rank-{rank:05d}"


def segment_dir(rank: int, segment: int) -> str:
    return f"{part_dir(rank)}/seg-{segment:09d}"


def journal_key(rank: int, segment: int) -> str:
    return f"{part_dir(rank)}/journal/seg-{segment:09d}.json"


def finished_key(rank: int) -> str:
    return f"{part_dir(rank)}/finished.json"


def write_blob(location: Location, key: str, data: np.ndarray, codec: Any) -> dict[str, Any]:
    """One array of a segment as one compressed object; its size and CRC go in the journal."""
    raw = np.ascontiguousarray(data)
    if codec is not None and raw.size:
        blob = codec.encode(raw)
    else:  # the array's own bytes, not a copy of them
        blob = memoryview(raw.reshape(-1).view(np.uint8))
    location.put_bytes(key, blob)
    return {"shape": list(raw.shape), "dtype": raw.dtype.str, "bytes": len(blob), "crc32": zlib.crc32(blob)}


def read_blob(location: Location, key: str, info: dict[str, Any], codec: Any,
              out: np.ndarray | None = None) -> np.ndarray:
    """Decode one segment array, refusing a blob whose checksum does not match its journal entry.
    With `out` (a uint8 buffer at least the decoded size) the rows land there, a view of it is
    returned, and no fresh pages are touched (the shuffle reuses one buffer for every segment)."""
    dtype, shape = np.dtype(info["dtype"]), tuple(info["shape"])
    size = int(np.prod(shape)) * dtype.itemsize
    raw = codec is None or not size
    with location.fs.open(location.join(key), "rb") as f:
        if out is not None and raw:
            blob = out[:info["bytes"]]
            f.readinto(memoryview(blob))
        else:
            blob = f.read()
    if zlib.crc32(blob) != info["crc32"]:
        raise KuklaError(f"{location.join(key)} is damaged (checksum mismatch): delete its journal entry "
                         f"{key.rsplit('/', 2)[0]} -> journal and rerun the writer to rewrite that segment")
    if raw:
        return np.frombuffer(blob, dtype=dtype).reshape(shape)
    if out is None:
        return np.frombuffer(codec.decode(blob), dtype=dtype).reshape(shape)
    return np.frombuffer(codec.decode(blob, out=out[:size]), dtype=dtype).reshape(shape)


def read_journal(location: Location, rank: int) -> dict[int, dict[str, Any]]:
    """Committed segments of one rank: {segment id: journal entry}."""
    entries = {}
    for name in location.listdir(f"{part_dir(rank)}/journal"):
        if name.startswith("seg-") and name.endswith(".json"):
            entry = location.read_json(f"{part_dir(rank)}/journal/{name}")
            entries[int(entry["segment"])] = entry
    return entries


class StoreWriter:
    """Writes one rank's part of a store; `finalize_store` later merges and shuffles all parts."""

    def __init__(self, location: Location, attrs: dict[str, Any], rank: int) -> None:
        self.location, self.attrs, self.rank = location, attrs, rank
        self.hooks: dict[str, int] = dict(attrs["hooks"])
        self.dtype: str = attrs["dtype"]
        self.codec = numcodecs_codec(attrs["codec"])
        self.lock = Lease(location, f"{part_dir(rank)}/lock.json", f"rank {rank} of store {location.url}").acquire()
        journal = read_journal(location, rank)
        self.committed: set[int] = set(journal)
        self.stats = {hook: HookStats() for hook in self.hooks}
        for entry in journal.values():
            for hook, value in entry["stats"].items():
                self.stats[hook].merge(HookStats.from_json(value))
        self.reference: dict[str, Any] | None = next(iter(journal.values()), None)
        """One committed segment's whole journal entry: the optional arrays every later one must match."""
        self.journal: dict[int, dict[str, Any]] = {segment: _manifest_row(e) for segment, e in journal.items()}
        """Each committed segment's manifest row (rows, sequence range): a whole entry is ~6 KB."""

    @classmethod
    def open(cls, path: str | Path, meta: dict[str, Any], *, rank: int = 0, world: int = 1,
             overwrite: bool = False, dtype: str = "bfloat16", codec: str = DEFAULT_CODEC,
             chunk_rows: int | None = None) -> "StoreWriter":
        """Create the store (state "writing") or resume this rank's part of the same run."""
        hooks = check_meta(meta)
        dtype, codec = coerce("dtype", StoreDtype, dtype), check_codec(codec)
        if not (0 <= rank < world):
            raise KuklaError(f"rank {rank} is outside world size {world}")
        location = Location(path)
        chunk_rows = chunk_rows or chunk_rows_for(list(hooks.values()), STORED_NUMPY[dtype].itemsize)
        wanted = new_attributes(meta, dtype=dtype, codec=codec, world=world, chunk_rows=chunk_rows)
        existing = _existing(location)
        if existing is not None:
            same = _same_run(existing, wanted)
            if not overwrite and not same:
                raise KuklaError(f"{location.url} holds a store of a different run ({_difference(existing, wanted)}): "
                                 "choose another path, or pass --overwrite (overwrite = true in a file) to replace it")
            if not overwrite and existing.get("state") != "writing":
                raise KuklaError(f"{location.url} is already a {existing.get('state')} store of this run: "
                                 "nothing to write (pass --overwrite, or overwrite = true in a file, to rebuild it)")
            if same and existing.get("state") == "writing":
                return cls(location, existing, rank)
        if location.exists() and (overwrite or existing is None) and location.listdir(""):
            if not overwrite:
                raise KuklaError(f"{location.url} exists and is not a kukla store: choose an empty or new path")
            location.remove("")
        with _disk_full(location, "creating the store"):
            Attributes(location, wanted).write()
        return cls(location, wanted, rank)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the lock (committed segments stay; the part can be resumed)."""
        self.lock.release()

    def write_segment(self, segment: int, rows: Rows) -> dict[str, Any]:
        """Write one segment and commit it in the journal once its data is durable; returns its
        journal entry. Besides the row-aligned arrays, `rows` may hold the whole windows its rows
        come from (`windows/sequence` [m], `windows/token_id` [m, context_size]; in every segment or
        in none), which finalize turns into windows/*."""
        if not self.lock.held:
            raise KuklaError(f"writer for {self.location.url} is closed: open a new StoreWriter to resume")
        self.lock.check()
        if segment in self.committed:
            raise KuklaError(f"segment {segment} of rank {self.rank} is already committed: skip the ids in "
                             "writer.committed when resuming")
        windows = {k: v for k, v in rows.items() if k.startswith("windows/")}
        arrays, truth, floats = self._stored_arrays(segment, {k: v for k, v in rows.items() if k not in windows})
        n = next(iter(arrays.values())).shape[0]
        given = segment_windows(windows, self.attrs.get("context_size"), segment) if windows else None
        previous = self.reference
        if previous is not None and (previous.get("windows") is None) != (given is None):
            raise KuklaError(f"segment {segment}: windows given in {'this' if given else 'earlier'} segment(s) "
                             "only: give them with every segment or with none")
        key = segment_dir(self.rank, segment)
        with _disk_full(self.location, f"writing segment {segment}"):
            infos = {name: write_blob(self.location, f"{key}/{name}.bin", data, self.codec)
                     for name, data in arrays.items()}
            window_infos = None if given is None else {
                "first": int(given["windows/sequence"].min(initial=0)),
                "last": int(given["windows/sequence"].max(initial=-1)),
                "arrays": {name: write_blob(self.location, f"{key}/{name}.bin", data, self.codec)
                           for name, data in given.items()}}
        seg_stats = {}
        for hook in self.hooks:
            stats = HookStats()
            stats.add(floats[hook])
            seg_stats[hook] = stats.summary(self.hooks[hook])
        sequences = arrays["tokens/sequence"]
        entry = {"segment": segment, "rank": self.rank, "rows": n, "stats": seg_stats, "truth": truth, "arrays": infos,
                 "windows": window_infos,
                 "first_sequence": int(sequences.min()) if n else -1,
                 "last_sequence": int(sequences.max()) if n else -1, "time": time.time()}
        with _disk_full(self.location, f"committing segment {segment}"):
            self.location.put_json(journal_key(self.rank, segment), entry)
        self.reference = self.reference or entry
        self.journal[segment] = _manifest_row(entry)
        self.committed.add(segment)
        for hook, value in seg_stats.items():
            self.stats[hook].merge(HookStats.from_json(value))
        return entry

    def _stored_arrays(self, segment: int, rows: Rows) -> tuple[dict[str, np.ndarray], list[Any],
                                                                 dict[str, np.ndarray]]:
        """Check a segment's keys and row counts; convert to on-disk dtypes (and float32 for the stats)."""
        unknown = [k for k in rows if not (k.startswith(("acts/", "truth/")) or k in TOKEN_ARRAYS
                                           or k in OPTIONAL_TOKEN_ARRAYS)]
        if unknown:
            raise KuklaError(f"segment {segment}: unknown key {unknown[0]!r}: use acts/<hook>, "
                             f"{', '.join([*TOKEN_ARRAYS, *OPTIONAL_TOKEN_ARRAYS])}, truth/<name> or windows/sequence + "
                             "windows/token_id")
        for key in rows:
            if key.startswith("acts/") and key[5:] not in self.hooks:
                raise KuklaError(f"segment {segment}: hook {key[5:]!r} is not in this store; its hooks: "
                                 f"{', '.join(self.hooks)}")
        missing = [h for h in self.hooks if f"acts/{h}" not in rows]
        if missing:
            raise KuklaError(f"segment {segment}: no rows for hook {missing[0]!r}: every segment holds every hook")
        counts = {k: int(v.shape[0]) for k, v in rows.items()}
        if len(set(counts.values())) != 1:
            raise KuklaError(f"segment {segment}: arrays have different row counts {counts}: rows must be aligned")
        n = next(iter(counts.values()))
        arrays: dict[str, np.ndarray] = {}
        floats: dict[str, np.ndarray] = {}
        for hook, width in self.hooks.items():
            x = rows[f"acts/{hook}"]
            if tuple(x.shape) != (n, width):
                raise KuklaError(f"segment {segment}: hook {hook!r} has shape {tuple(x.shape)}, expected ({n}, {width})")
            arrays[f"acts/{hook}"] = to_stored(x, self.dtype, f"segment {segment}, hook {hook!r}")
            floats[hook] = as_numpy(x).astype(np.float32, copy=False)
        for name, dtype in TOKEN_ARRAYS.items():
            arrays[name] = (as_numpy(rows[name]).astype(dtype).reshape(n) if name in rows
                            else np.full(n, -1, dtype=dtype))
        truth = []  # the optional arrays' specs (finalize permutes whatever this lists)
        for key in sorted(k for k in rows if k.startswith("truth/") or k in OPTIONAL_TOKEN_ARRAYS):
            data = as_numpy(rows[key])
            arrays[key] = np.ascontiguousarray(data, dtype=OPTIONAL_TOKEN_ARRAYS.get(key, data.dtype))
            truth.append(ArraySpec(key, arrays[key].shape[1:], arrays[key].dtype).to_json())
        previous = self.reference
        if previous is not None and previous["truth"] != truth:
            raise KuklaError(f"segment {segment}: optional arrays {truth} differ from earlier segments' "
                             f"{previous['truth']}: every segment holds the same truth/* and optional tokens/*")
        return arrays, truth, floats

    def put_static(self, name: str, array: Any) -> None:
        """A store-level array (e.g. "static/directions"), kept as given through finalize."""
        name = name.removeprefix("static/")
        data = np.ascontiguousarray(as_numpy(array))
        with _disk_full(self.location, f"writing static/{name}"):
            group = zarr.open_group(self.location.zarr_store(), mode="a")
            target = group.create_array(f"static/{name}", shape=data.shape, dtype=data.dtype,
                                        chunks=data.shape or None, overwrite=True)
            target[...] = data
            target.attrs["crc32"] = data_crc32(data)  # verify checks it: static chunks carry no CRC codec
            self.location.make_durable(f"static/{name}")
            Attributes(self.location, self.attrs).write()  # zarr rewrote the root metadata: restore ours

    def finish(self) -> None:
        """Mark this rank's part complete (with its Parquet manifest); finalize needs every rank's."""
        entries = [self.journal[s] for s in sorted(self.journal)]
        with _disk_full(self.location, f"finishing rank {self.rank}"):
            write_manifest(self.location, f"{part_dir(self.rank)}/manifest.parquet", entries)
            self.location.put_json(finished_key(self.rank), {
                "rank": self.rank, "rows": sum(int(e["rows"]) for e in entries),
                "segments": len(entries), "stats": {h: s.summary(self.hooks[h]) for h, s in self.stats.items()},
            })


def segment_windows(windows: Mapping[str, Any], context_size: Any, segment: int) -> dict[str, np.ndarray]:
    """A segment's windows as stored ({"windows/sequence": int64 [m], "windows/token_id": int32 [m, C]}),
    or a one-line error."""
    if set(windows) != {"windows/sequence", "windows/token_id"}:
        raise KuklaError(f"segment {segment}: windows need exactly windows/sequence and windows/token_id, "
                         f"got {sorted(windows)}")
    if not isinstance(context_size, int) or context_size < 1:
        raise KuklaError(f"segment {segment}: windows need the store meta's 'context_size' (tokens per window)")
    sequence = as_numpy(windows["windows/sequence"]).astype(np.int64).reshape(-1)
    tokens = as_numpy(windows["windows/token_id"])
    if tokens.shape != (len(sequence), context_size):
        raise KuklaError(f"segment {segment}: windows/token_id has shape {tuple(tokens.shape)}, expected "
                         f"({len(sequence)}, {context_size}): one row of context_size ids per window")
    if (sequence < 0).any():
        raise KuklaError(f"segment {segment}: window sequence ids must be ≥ 0 (they index windows/*)")
    return {"windows/sequence": sequence, "windows/token_id": tokens.astype(np.int32)}


def _manifest_row(entry: dict[str, Any]) -> dict[str, Any]:
    """What `finish` writes of a segment's journal entry (manifest.parquet's columns)."""
    return {key: entry[key] for key in ("segment", "rank", "rows", "first_sequence", "last_sequence")}


@contextmanager
def _disk_full(location: Location, what: str) -> Iterator[None]:
    """Turn a full disk inside the block into the one-line "free some space and rerun" error."""
    try:
        yield
    except OSError as exc:
        raise disk_full_error(exc, location, what) or exc


def run_state(location: Location, meta: dict[str, Any], *, dtype: str, codec: str = DEFAULT_CODEC,
              world: int = 1) -> str | None:
    """The state ("writing", "finalizing", "finalized") of the store at `location` when it holds
    this very run (the same meta, dtype, codec and world), so a rerun does only what is left;
    None when there is no store of this run there."""
    existing = _existing(location)
    wanted = {"fingerprint": meta_fingerprint(meta), "dtype": dtype, "codec": codec, "world": world}
    return existing["state"] if existing is not None and _same_run(existing, wanted) else None


def _same_run(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return all(existing.get(key) == wanted[key] for key in ("fingerprint", "dtype", "codec", "world"))


def _difference(existing: dict[str, Any], wanted: dict[str, Any]) -> str:
    """What differs between the store's run and this one, for the error that refuses it."""
    keys = [k for k in ("dtype", "codec", "world") if existing.get(k) != wanted[k]]
    keys += sorted(k for k in set(existing) | set(wanted)
                   if k not in RESERVED and k != "where" and existing.get(k) != wanted.get(k))
    if not keys:
        return "its metadata differs"
    name, there, now = _first_difference(keys[0], existing.get(keys[0]), wanted.get(keys[0]))
    there, now = (json.dumps(value, default=str)[:120] for value in (there, now))
    return f"{name}: {there} there, {now} now"


def _first_difference(name: str, there: Any, now: Any) -> tuple[str, Any, Any]:
    """The innermost entry of two values that differs (`dataset.bytes`), not the whole values: a
    dataset's size is its last key, which a cut of the whole entry left out."""
    if isinstance(there, dict) and isinstance(now, dict):
        key = next(k for k in [*there, *(k for k in now if k not in there)] if there.get(k) != now.get(k))
        return _first_difference(f"{name}.{key}", there.get(key), now.get(key))
    return name, there, now


def _existing(location: Location) -> dict[str, Any] | None:
    if not location.exists("zarr.json"):
        return None
    try:
        return Attributes.read(location).value
    except KuklaError:
        return None


def unfinished_ranks(path: str | Path | Location) -> list[int]:
    """Ranks of a store being written that have not called `finish()` yet (empty once finalized)."""
    location = path if isinstance(path, Location) else Location(path)
    attrs = Attributes.read(location).value
    if attrs["state"] != "writing":
        return []
    return [r for r in range(attrs["world"]) if not location.exists(finished_key(r))]


@dataclass
class SegmentTable:
    """All committed segments of all ranks, read as one row sequence in (rank, segment) order."""

    location: Location
    entries: list[dict[str, Any]]
    codec: Any
    _last: dict[str, tuple[tuple[int, int], np.ndarray]] = field(default_factory=dict)

    @classmethod
    def read(cls, location: Location, world: int, codec: str) -> "SegmentTable":
        entries = [e for rank in range(world) for _, e in sorted(read_journal(location, rank).items())]
        return cls(location, entries, numcodecs_codec(codec))

    @property
    def n_rows(self) -> int:
        return sum(int(e["rows"]) for e in self.entries)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a row-aligned array across segment boundaries (stored dtype)."""
        pieces, offset = [], 0
        for entry in self.entries:
            rows = int(entry["rows"])
            lo, hi = max(start, offset), min(stop, offset + rows)
            if lo < hi:
                pieces.append(self._segment_array(entry, name)[lo - offset:hi - offset])
            offset += rows
            if offset >= stop:
                break
        return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]

    def _segment_array(self, entry: dict[str, Any], name: str) -> np.ndarray:
        """A whole segment's array, decoded once for consecutive reads."""
        key = (int(entry["rank"]), int(entry["segment"]))
        cached = self._last.get(name)
        if cached is None or cached[0] != key:
            blob_key = f"{segment_dir(*key)}/{name}.bin"
            cached = (key, read_blob(self.location, blob_key, entry["arrays"][name], self.codec))
            self._last[name] = cached
        return cached[1]
