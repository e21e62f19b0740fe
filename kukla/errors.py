"""How a command ends early: a one-line error the user can fix, or a stop on SIGTERM.

The CLI prints a `KuklaError` as one line (no traceback), so its message must say
what went wrong and what to do about it.

SIGTERM is the cluster's "you are being preempted": stop at a committed point, exit 143.
Kubernetes and Slurm send SIGTERM, then SIGKILL after a grace period. Harvest, finalize
and import commit every step with one atomic write, so for them SIGTERM acts at once
(`stop_on_sigterm`): the work in flight is abandoned exactly as a SIGKILL would leave it,
and the `with` blocks above release their leases on the way out. Python drops an exception
raised while a `__del__` runs (it prints "Exception ignored in …" and goes on), so their loops
also call `preemption_point()` between units, which raises it again. Training instead asks
(`sigterm_requested`) after each step, so it can write a checkpoint first.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator


class KuklaError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(KuklaError):
    """A configuration value is invalid; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


#: The exit status of a process stopped by SIGTERM (128 + 15), what batch systems expect.
EXIT_SIGTERM = 128 + signal.SIGTERM

_requested = threading.Event()  # inside checkpoint_on_sigterm
_stopping = threading.Event()  # inside stop_on_sigterm: a raise that Python may have dropped


class Preempted(BaseException):
    """Raised in the main thread by SIGTERM. Not an Exception, so that no broad `except
    Exception` swallows it; the CLI prints it as one line and exits 143."""

    def __str__(self) -> str:
        return self.args[0] if self.args else "SIGTERM: committed work is kept; rerun the same command to resume"


def sigterm_requested() -> bool:
    """True once SIGTERM arrived inside `checkpoint_on_sigterm`."""
    return _requested.is_set()


@contextmanager
def _handler(handle: Any) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only; its own handler applies
        return
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise(signum: int, frame: Any) -> None:
    _stopping.set()
    raise Preempted()


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Inside the block, SIGTERM raises `Preempted` wherever the main thread is (and again at the
    next `preemption_point`, should Python have dropped it)."""
    outermost = signal.getsignal(signal.SIGTERM) is not _raise
    if outermost:
        _stopping.clear()
    try:
        with _handler(_raise):
            yield
    finally:
        if outermost:
            _stopping.clear()


def preemption_point() -> None:
    """Between two units of work inside `stop_on_sigterm`: raise `Preempted` if SIGTERM came
    (its first raise may have landed in a `__del__`, where Python drops exceptions)."""
    if _stopping.is_set():
        raise Preempted()


@contextmanager
def checkpoint_on_sigterm() -> Iterator[None]:
    """Inside the block, SIGTERM only sets `sigterm_requested()`; the loop decides when to stop."""
    _requested.clear()
    with _handler(lambda signum, frame: _requested.set()):
        try:
            yield
        finally:
            _requested.clear()
