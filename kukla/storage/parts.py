"""Each rank's part of a store being written: segments, their journal, and the lock.

A segment's data goes to `_parts/rank-R/seg-S/<array>.bin` (one compressed object per
array, transient: the shuffle turns them into the final sharded Zarr arrays); only after it is
durable does `_parts/rank-R/journal/seg-S.json` appear. The journal entry is the commit:
a segment without one never happened, and is simply rewritten on resume.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
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


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a process (guards against a recycled pid), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except OSError:
        return "unknown"


def _alive(info: dict[str, Any]) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # cannot tell from here
    pid = int(info.get("pid", -1))
    if os.path.exists("/proc/self/stat"):
        started = _start_time(pid)
        return started is not None and started == info.get("started", started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    """One live writer per part. The lock records pid, host and process start time, so a lock
    left by a killed writer on this host is taken over by the next run; on another host it is
    refused with the lock's path to delete once that writer is known dead."""

    def __init__(self, location: Location, key: str, what: str) -> None:
        self.location, self.key, self.what = location, key, what
        self.token = uuid.uuid4().hex
        self.held = False

    def acquire(self) -> None:
        if self.location.exists(self.key):
            try:
                info = self.location.read_json(self.key)
            except (ValueError, FileNotFoundError):
                info = {}
            if info and _alive(info):
                where = f"process {info.get('pid')} on {info.get('host')}"
                hint = ("wait for it or stop it, then rerun to resume" if info.get("host") == socket.gethostname()
                        else f"if it is dead, delete {self.location.join(self.key)} and rerun")
                raise KuklaError(f"{self.what} is already being written by {where}: {hint}")
            self.location.remove(self.key)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
                "token": self.token, "time": time.time()}
        self._create(info)
        if self.location.read_json(self.key).get("token") != self.token:
            raise KuklaError(f"{self.what} was locked by another writer at the same moment: rerun to resume")
        self.held = True

    def _create(self, info: dict[str, Any]) -> None:
        data = json.dumps(info).encode()
        if not self.location.is_local:
            self.location.put_bytes(self.key, data)
            return
        path = self.location.join(self.key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise KuklaError(f"{self.what} was locked by another writer at the same moment: rerun to resume") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def release(self) -> None:
        if self.held:
            try:
                if self.location.read_json(self.key).get("token") == self.token:
                    self.location.remove(self.key)
            except FileNotFoundError:
                pass
            self.held = False
