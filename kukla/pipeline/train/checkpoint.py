"""Checkpoints that a kill can never leave half-written.

Layout of a run's output directory:

    out/checkpoints/step-00001000/trainer_state.pt   optimisers, step, RNG states, stream cursors
    out/checkpoints/step-00001000/trainer_state.pt.sha256   its SHA-256, checked before a resume trusts it
    out/checkpoints/step-00001000/<member>/           SAELens-loadable dictionary dir per sweep member
    out/checkpoints/latest                            name of the newest complete checkpoint
    out/<member>/                                     the final dictionaries

A checkpoint is built in a hidden temporary directory, renamed into place (atomic on one
file system), and only then named by `latest` (itself replaced atomically). A kill at any
moment leaves `latest` pointing at a complete checkpoint, or at nothing yet.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from kukla.atomic import fsync_tree, write_atomic
from kukla.errors import KuklaError
from kukla.storage.location import Location, disk_full_error

STATE_FILE = "trainer_state.pt"
_DIGEST = STATE_FILE + ".sha256"
_LATEST = "latest"


def checkpoints_dir(out: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(out) / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of the run in `out`, or None."""
    pointer = checkpoints_dir(out) / _LATEST
    if not pointer.exists():
        return None
    path = checkpoints_dir(out) / pointer.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise KuklaError(f"{pointer} names {path.name}, which is incomplete; delete {pointer} to start over")
    return path


def publish_dir(build: Callable[[Path], None], final: Path) -> Path:
    """Build a directory in a temporary sibling, then rename it over `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        build(tmp)
        fsync_tree(tmp)
    except BaseException:  # a full disk, a kill by SIGTERM: leave no half-built folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # an earlier run reached the same step: replace it whole
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def write_checkpoint(out: Path, step: int, build: Callable[[Path], None], keep: int) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep`."""
    root = checkpoints_dir(out)
    try:
        path = publish_dir(build, root / f"step-{step:08d}")
        write_atomic(root / _LATEST, (path.name + "\n").encode())
    except OSError as exc:
        full = disk_full_error(exc, Location(out), f"writing checkpoint step-{step:08d}")
        raise (KuklaError(f"{full} with --resume") if full else exc) from None
    _prune(root, keep, path)
    return path


class _Writes:
    """A file whose write errors are kept (torch.save reports a full disk as a bare RuntimeError)
    and whose bytes are hashed as they go (a flipped byte in a pickle of tensors still loads)."""

    def __init__(self, file: Any, written: Callable[[int], Any] | None = None) -> None:
        self.file, self.error, self.sha256, self.written = file, None, hashlib.sha256(), written

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        try:
            n = self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise
        if self.written is not None:
            self.written(len(data))
        return n

    def flush(self) -> None:
        self.file.flush()


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in `obj` (nested in dicts, lists and tuples): near what saving it writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_state(path: Path, state: dict[str, Any], written: Callable[[int], Any] | None = None) -> None:
    """Write the trainer state (a plain torch pickle of tensors, ints and dicts) and its SHA-256;
    `written(n)` hears of each n bytes as they go (a progress bar's `update`)."""
    with open(Path(path) / STATE_FILE, "wb") as f:
        writes = _Writes(f, written)
        try:
            torch.save(state, writes)
        except RuntimeError:
            if writes.error is not None:
                raise writes.error from None
            raise
    (Path(path) / _DIGEST).write_text(writes.sha256.hexdigest() + "\n")


def load_state(checkpoint: Path) -> dict[str, Any]:
    """Read the trainer state written by `save_state` (our own file, so full unpickling), once
    its SHA-256 matches (checkpoints written before kukla recorded one are read unchecked)."""
    file, digest = Path(checkpoint) / STATE_FILE, Path(checkpoint) / _DIGEST
    if digest.exists():
        sha256 = hashlib.sha256()
        with open(file, "rb") as f:
            while block := f.read(16 << 20):
                sha256.update(block)
        if sha256.hexdigest() != digest.read_text().strip():
            raise KuklaError(f"{file} is damaged (checksum mismatch): delete {checkpoint} and write the name of an "
                             f"earlier step-* folder into {file.parent.parent / _LATEST}, "
                             "or train again without --resume")
    return torch.load(file, map_location="cpu", weights_only=False)


def _prune(root: Path, keep: int, newest: Path) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else steps:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # left by a killed writer
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)

