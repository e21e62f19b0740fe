"""Where a store lives, a local folder or an fsspec URL (file://, memory://, s3://, gs://), and
who holds a part of it: leases.

Object stores have no rename, so every commit in kukla is "write the data, then put one
small object" (a single PUT is atomic there). Locally we get the same guarantee with a
temporary file, fsync and `os.replace` (`kukla.atomic`), and fsync the data files before committing them.

A lease is one live holder of a store part, a finalize or a training `--out`, on any host: a
small JSON object (`lock.json`) naming its holder (host, pid, a random token)
and the time it was last renewed. While it works, the holder renews it from a background
thread every `lease/4` seconds. Another process takes it over when:

- it is older than its lease (the holder died or lost the network, on any host), or
- it was written on this host by a process that no longer exists (no need to wait).

A lease held on another host is watched before it is refused: renewed, its holder lives (the
error names it); expired, it is taken over. So a job rescheduled at once onto another host after
a kill waits out its predecessor's lease (at most one lease) instead of failing on it.

The lease is created with an exclusive write (`Location.create`): a hard link locally,
`mode="xb"` on fsspec filesystems that implement it (s3fs sends `If-None-Match: *`, gcsfs `ifGenerationMatch=0`,
adlfs `overwrite=False`). Where a filesystem has no exclusive write, kukla writes the
lease, reads it back and checks its own token: two processes starting within one
round trip of each other may then both believe they hold it; every renewal re-reads the
lease, so the loser notices at its next renewal and stops with an error.

`KUKLA_HOST` overrides the host name used as identity (tests; containers whose host name
is not unique); `KUKLA_LEASE_SECONDS` the lease length (default 60 s). Clocks of the
hosts sharing a store must agree to well within a lease (NTP does).
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import posixpath
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore

from kukla.atomic import (atomic_path, create_atomic, fsync_tree, remove_temporaries, remove_temporaries_of,
                          write_atomic)
from kukla.errors import KuklaError

logger = logging.getLogger(__name__)

#: OS errors that mean "no room left" (ENOSPC), a file size limit (EFBIG) or a quota (EDQUOT).
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
DIRECT_ALIGN = 4096  # O_DIRECT's alignment of addresses, offsets and sizes (a page covers every disk's block)


def aligned(size: int) -> int:
    """`size` rounded up to `DIRECT_ALIGN`."""
    return -(-size // DIRECT_ALIGN) * DIRECT_ALIGN


def aligned_buffer(size: int) -> np.ndarray:
    """A page-aligned uint8 buffer of `aligned(size)` bytes, as O_DIRECT reads and writes need.
    Private and populated up front: faulting its pages in one by one (or as shared memory) cost
    twice the CPU on a VM."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, max(DIRECT_ALIGN, aligned(size)), flags=flags), np.uint8)


class Location:
    """A store's root: a filesystem plus a path on it, with the few operations kukla needs."""

    def __init__(self, path: str | Path) -> None:
        text = str(path)
        if "://" in text and not text.startswith("file://"):
            self.fs, self.root = fsspec.core.url_to_fs(text)
            self.url = text.rstrip("/")
        else:
            local = text[len("file://"):] if text.startswith("file://") else text
            self.fs, self.root = LocalFileSystem(), str(Path(local).expanduser().absolute())
            self.url = self.root
        self.root = self.root.rstrip("/") or "/"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def join(self, *parts: str) -> str:
        parts = tuple(p for p in parts if p)
        return posixpath.join(self.root, *parts) if parts else self.root

    def zarr_store(self, sub: str = "", *, read_only: bool = False) -> zarr.abc.store.Store:
        """A Zarr store rooted at `sub` (local folders skip fsspec's overhead)."""
        path = self.join(sub) if sub else self.root
        if self.is_local:
            return LocalStore(path, read_only=read_only)
        url = f"{self.url}/{sub}" if sub else self.url
        return FsspecStore.from_url(url, read_only=read_only)

    def exists(self, sub: str = "") -> bool:
        return self.fs.exists(self.join(sub) if sub else self.root)

    def read_json(self, sub: str) -> Any:
        with self.fs.open(self.join(sub), "rb") as f:
            return json.loads(f.read())

    def put_bytes(self, sub: str, data: bytes | memoryview | list[Any]) -> None:
        """Write one object atomically: readers see the old content or the new, never a part.
        `data` may be a list of buffers, written back to back (no joined copy on local disks)."""
        path = self.join(sub)
        pieces = data if isinstance(data, list) else [data]
        if not self.is_local:
            self.fs.pipe_file(path, b"".join(bytes(piece) for piece in pieces))
            return
        write_atomic(path, pieces)  # a full disk or a stop leaves no partial file to fill the disk further

    def put_direct(self, sub: str, buffer: np.ndarray, size: int) -> None:
        """`put_bytes` of `buffer[:size]` past the page cache (O_DIRECT) where the disk allows: for
        scratch written once and read once, whose copy into fresh cache pages costs more CPU than
        the rest of the shuffle. `buffer` is page-aligned (`aligned_buffer`) and `aligned(size)` long."""
        if not self.is_local or not hasattr(os, "O_DIRECT"):
            self.put_bytes(sub, memoryview(buffer[:size]))
            return
        try:
            with atomic_path(self.join(sub)) as tmp:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
                try:
                    view, at = memoryview(buffer[:aligned(size)]), 0
                    while at < len(view):
                        at += os.write(fd, view[at:])
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # a file system without O_DIRECT: through the page cache
                raise
            self.put_bytes(sub, memoryview(buffer[:size]))

    def create(self, sub: str, data: bytes) -> bool:
        """Write one object unless one is there: True when this call made it. Exclusive locally and on
        object stores that implement `mode="xb"` (s3fs, gcsfs, adlfs); elsewhere it is written
        regardless, so a caller racing others reads it back to learn whose it is."""
        path = self.join(sub)
        if self.is_local:
            return create_atomic(path, data)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):  # no exclusive write here
            self.put_bytes(sub, data)
        return True

    def put_json(self, sub: str, value: Any) -> None:
        self.put_bytes(sub, json.dumps(value, indent=1, sort_keys=True).encode())

    def read_range(self, sub: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of one object (a ranged GET on object stores)."""
        if self.is_local:
            with open(self.join(sub), "rb") as f:
                f.seek(start)
                return f.read(stop - start)
        return self.fs.cat_file(self.join(sub), start=start, end=stop)

    def listdir(self, sub: str) -> list[str]:
        """Names (not paths) directly under `sub`; empty when it does not exist."""
        path = self.join(sub)
        if not self.fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))

    def remove(self, sub: str) -> None:
        """Delete `sub` and everything under it. Another process deleting the same tree meanwhile
        (the commit and a finalize worker that outlived it both clear `_finalize/`) is no error."""
        path = self.join(sub)
        while self.fs.exists(path):
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError:  # a file the other process took: delete what is left
                continue

    def remove_temporaries(self) -> None:
        """Delete the temporaries of writes killed mid-way in the store's arrays (local only: an
        object store's PUT leaves none); not beside the leases, which their holders still renew."""
        if self.is_local:
            for folder in Path(self.root).iterdir():
                if folder.is_dir() and not folder.name.startswith("_"):
                    remove_temporaries(folder)

    def make_durable(self, sub: str) -> None:
        """fsync every file under `sub` (local only: an object store's PUT is already durable)."""
        if self.is_local:
            fsync_tree(self.join(sub))

    def disk_usage(self, sub: str = "") -> int:
        """Bytes stored under `sub` (the whole store by default)."""
        path = self.join(sub) if sub else self.root
        return int(self.fs.du(path, total=True)) if self.fs.exists(path) else 0


def check_output_dir(path: str | Path, flag: str) -> None:
    """Refuse an output path that exists and is not a folder, before any work is done."""
    if Path(path).exists() and not Path(path).is_dir():
        raise KuklaError(f"{flag} {path} is a file, not a folder: give a folder path (it is created if missing)")


def disk_full_error(exc: OSError, location: Location, what: str) -> KuklaError | None:
    """A one-line error for a full disk, or None when `exc` is another OS error."""
    if exc.errno not in DISK_FULL_ERRNOS:
        return None
    return KuklaError(
        f"disk full while {what} in {location.url} ({os.strerror(exc.errno)}): committed work is kept;"
        " free some space and rerun the same command to resume"
    )


DEFAULT_LEASE_SECONDS = 60.0


def host_name() -> str:
    """This process's host identity (KUKLA_HOST, else the host name)."""
    return os.environ.get("KUKLA_HOST") or socket.gethostname()


def lease_seconds() -> float:
    text = os.environ.get("KUKLA_LEASE_SECONDS")
    try:
        value = float(text) if text else DEFAULT_LEASE_SECONDS
    except ValueError:
        raise KuklaError(f"KUKLA_LEASE_SECONDS={text!r} is not a number of seconds: set it to "
                         f"e.g. 60, or unset it for the default {DEFAULT_LEASE_SECONDS:g}") from None
    if value <= 0:
        raise KuklaError(f"KUKLA_LEASE_SECONDS={text!r} must be positive: set it to e.g. 60, "
                         f"or unset it for the default {DEFAULT_LEASE_SECONDS:g}")
    return value


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a process (guards against a recycled pid), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except OSError:
        return "unknown"


def _dead_here(info: dict[str, Any]) -> bool:
    """True when the lease was taken on this host by a process that is gone."""
    if info.get("host") != host_name():
        return False
    pid = int(info.get("pid", -1))
    if os.path.exists("/proc/self/stat"):
        started = _start_time(pid)
        return started is None or started != info.get("started", started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _expired(info: dict[str, Any], now: float) -> bool:
    return now - float(info.get("time", 0.0)) > float(info.get("lease", DEFAULT_LEASE_SECONDS))


def _live(info: dict[str, Any]) -> bool:
    """Whether the lease's holder may still be working: what no other process may take over."""
    return not (_expired(info, time.time()) or _dead_here(info))


def _read(location: Location, key: str) -> dict[str, Any] | None:
    """The lease at `key`: None when there is none, {} when torn or unreadable (treated as expired)."""
    try:
        value = location.read_json(key)
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}
    return value if isinstance(value, dict) else {}


def live_holder(location: Location, key: str) -> dict[str, Any] | None:
    """The lease at `key` while its holder may still be working (pid, host, …), else None."""
    info = _read(location, key)
    return info if info is not None and _live(info) else None


def remove_stale(location: Location, key: str) -> None:
    """Remove the lease at `key` if its holder is dead, unless it was renewed or taken over
    between the two reads (a holder's renewal changes it)."""
    current = _read(location, key)
    if current is not None and not _live(current) and _read(location, key) == current:
        location.remove(key)
        if location.is_local:  # and the temporary of a renewal it was stopped or killed in
            remove_temporaries_of(location.join(key))


class Lease:
    """One live holder of `key` in `location`; renewed in the background while held."""

    def __init__(self, location: Location, key: str, what: str) -> None:
        self.location, self.key, self.what = location, key, what
        self.token = uuid.uuid4().hex
        self.seconds = lease_seconds()
        self.held = False
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "Lease":
        current = self._watched_holder()
        if current is not None:
            age = time.time() - float(current.get("time", 0.0))
            raise KuklaError(
                f"{self.what} is in use by process {current.get('pid')} on {current.get('host')} (lease renewed "
                f"{age:.0f} s ago, expires after {float(current.get('lease', 0)):.0f} s): wait for it or stop it; "
                "a dead holder's lease is taken over once it expires, so then rerun to resume")
        remove_stale(self.location, self.key)  # a dead holder's: taken over
        if not self._create(self._info()) or (self._read() or {}).get("token") != self.token:
            raise KuklaError(f"{self.what} was taken by another process at the same moment: rerun once it is done")
        self.held = True
        self._thread = threading.Thread(target=self._renew_loop, name=f"kukla-lease {self.key}", daemon=True)
        self._thread.start()
        return self

    def _watched_holder(self) -> dict[str, Any] | None:
        """The lease's live holder, None when there is none. A holder on another host may be dead
        without this host being able to tell (a killed pod, a lost node, a job rescheduled at
        once): its lease is watched until it is renewed (the holder lives) or expires (taken
        over), so a rescheduled job starts instead of failing on its predecessor's lease."""
        current = live_holder(self.location, self.key)
        if current is None or current.get("host") == host_name():
            return current
        seconds = float(current.get("lease", self.seconds))
        logger.info("%s: process %s on %s holds it; waiting up to %.0f s for its lease to be renewed (it lives) "
                    "or to expire (taken over)", self.what, current.get("pid"), current.get("host"),
                    float(current.get("time", 0.0)) + seconds - time.time())
        while (now := live_holder(self.location, self.key)) is not None:
            if (now.get("token"), now.get("time")) != (current.get("token"), current.get("time")):
                return now  # renewed, or taken by another process: alive
            time.sleep(seconds / 16)
        return None

    def release(self) -> None:
        """Stop renewing and remove the lease (if it is still ours)."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self.held = False
        current = self._read()
        if current is not None and current.get("token") == self.token:
            self.location.remove(self.key)

    def check(self) -> None:
        """Raise if another process took the lease over (this one stalled past its lease)."""
        if self.lost:
            raise KuklaError(self.lost)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _info(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"pid": pid, "host": host_name(), "started": _start_time(pid), "token": self.token,
                "time": time.time(), "lease": self.seconds}

    def _read(self) -> dict[str, Any] | None:
        return _read(self.location, self.key)

    def _create(self, info: dict[str, Any]) -> bool:
        """Exclusive create; False when another process created it first (where a filesystem has no
        exclusive write, `acquire` reads the lease back)."""
        return self.location.create(self.key, json.dumps(info).encode())

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                current = self._read()
                if current is None or current.get("token") != self.token:
                    holder = f"process {current.get('pid')} on {current.get('host')}" if current else "nobody"
                    self.lost = (f"{self.what}: this process's lease was taken over by {holder} (it stalled for "
                                 f"more than {self.seconds:.0f} s); stop one of them and rerun to resume")
                    return
                self.location.put_bytes(self.key, json.dumps({**current, "time": time.time()}).encode())
            except OSError:
                continue  # a network blip: retry at the next renewal, well within the lease
