"""Segments are committed by a background thread, so encoding and writing overlap the next forward.

The queue is bounded (`depth` segments waiting, one being written, one being filled by the
forward), so host memory stays a few segments whatever the store's size. The writer thread's
first error (a full disk is already a one-line `KuklaError` from the store) stops it; the main
thread raises that same error at its next `submit` or at `close`. Segments committed before it
stay committed, so a rerun resumes after them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from kukla.storage import StoreWriter
from kukla.storage.writer import Rows


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
                self.writer.write_segment(segment, rows())
                arrays = self.writer.journal[segment]["arrays"].values()
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
