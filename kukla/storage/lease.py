"""Leases: one live holder of a store part, a finalize or a training `--out`, on any host.

A lease is a small JSON object (`lock.json`) naming its holder (host, pid, a random token)
and the time it was last renewed. While it works, the holder renews it from a background
thread every `lease/4` seconds. Another process takes it over when:

- it is older than its lease (the holder died or lost the network, on any host), or
- it was written on this host by a process that no longer exists (no need to wait).

The lease is created with an exclusive write (`Location.create`): a hard link locally, `mode="xb"` on fsspec
filesystems that implement it (s3fs sends `If-None-Match: *`, gcsfs `ifGenerationMatch=0`,
adlfs `overwrite=False`). Where a filesystem has no exclusive write, kukla writes the
lease, reads it back and checks its own token: two processes starting within one
round trip of each other may then both believe they hold it; every renewal re-reads the
lease, so the loser notices at its next renewal and stops with an error.

`KUKLA_HOST` overrides the host name used as identity (tests; containers whose host name
is not unique); `KUKLA_LEASE_SECONDS` the lease length (default 60 s). Clocks of the
hosts sharing a store must agree to well within a lease (NTP does).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from kukla.errors import KuklaError
from kukla.storage.location import Location

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
        current = live_holder(self.location, self.key)
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
