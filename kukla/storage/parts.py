"""Each rank's part of a store being written: segments, their journal, and the lock.

A segment's data goes to `_parts/rank-R/seg-S/<array>.bin` (one compressed object per
array, transient: the shuffle turns them into the final sharded Zarr arrays); only after it is
durable does `_parts/rank-R/journal/seg-S.json` appear. The journal entry is the commit:
a segment without one never happened, and is simply rewritten on resume. The part's writer
holds a lease on `_parts/rank-R/lock.json` (kukla.storage.lease).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kukla.errors import KuklaError
from kukla.storage.codecs import numcodecs_codec
from kukla.storage.location import Location


def part_dir(rank: int) -> str:
    return f"_parts/rank-{rank:05d}"


def segment_dir(rank: int, segment: int) -> str:
    return f"{part_dir(rank)}/seg-{segment:09d}"


def journal_key(rank: int, segment: int) -> str:
    return f"{part_dir(rank)}/journal/seg-{segment:09d}.json"


def finished_key(rank: int) -> str:
    return f"{part_dir(rank)}/finished.json"


def read_journal(location: Location, rank: int) -> dict[int, dict[str, Any]]:
    """Committed segments of one rank: {segment id: journal entry}."""
    entries = {}
    for name in location.listdir(f"{part_dir(rank)}/journal"):
        if name.startswith("seg-") and name.endswith(".json"):
            entry = location.read_json(f"{part_dir(rank)}/journal/{name}")
            entries[int(entry["segment"])] = entry
    return entries


def write_blob(location: Location, key: str, data: np.ndarray, codec: Any) -> dict[str, Any]:
    """One array of a segment as one compressed object; its size and CRC go in the journal."""
    raw = np.ascontiguousarray(data)
    blob = codec.encode(raw) if codec is not None and raw.size else raw.tobytes()
    location.put_bytes(key, blob)
    return {"shape": list(raw.shape), "dtype": raw.dtype.str, "bytes": len(blob), "crc32": zlib.crc32(blob)}


def read_blob(location: Location, key: str, info: dict[str, Any], codec: Any) -> np.ndarray:
    """Decode one segment array, refusing a blob whose checksum does not match its journal entry."""
    with location.fs.open(location.join(key), "rb") as f:
        blob = f.read()
    if zlib.crc32(blob) != info["crc32"]:
        raise KuklaError(f"{location.join(key)} is damaged (checksum mismatch): delete its journal entry "
                         f"{key.rsplit('/', 2)[0]} -> journal and rerun the writer to rewrite that segment")
    dtype, shape = np.dtype(info["dtype"]), tuple(info["shape"])
    if codec is None or not int(np.prod(shape)):
        return np.frombuffer(blob, dtype=dtype).reshape(shape)
    return np.frombuffer(codec.decode(blob), dtype=dtype).reshape(shape)


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
