"""Local files that are either wholly there or not at all, and survive a power cut.

Every file a later step trusts (store metadata and chunks, dictionary weights, checkpoint
pointers, metrics) is written to a temporary sibling, fsynced, renamed over its name
with `os.replace`, and its folder fsynced so the rename itself is durable. A write that
fails (a full disk, a SIGTERM) leaves the old file and no temporary behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Sequence

Buffer = bytes | bytearray | memoryview
TEMPORARY = ".tmp-"
"""What a temporary's name holds between its file's name and 16 random hex digits."""


def fsync_file(path: str | Path) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in `path` survive a power cut (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file under `path` (or `path` itself), then each folder: before the tree is named."""
    if os.path.isfile(path):
        fsync_file(path)
        return
    for folder, _, files in os.walk(path):
        for name in files:
            fsync_file(os.path.join(folder, name))
        fsync_dir(folder)


def remove_temporaries(folder: str | Path) -> None:
    """Delete what killed writers left under `folder`: their temporaries are never renamed, and
    their random names mean no later write of the same file replaces them."""
    _remove(Path(folder).rglob(f"*{TEMPORARY}*"))


def remove_temporaries_of(path: str | Path) -> None:
    """Delete the temporaries killed writers of the one file `path` left beside it."""
    path = Path(path)
    _remove(path.parent.glob(f"{path.name}{TEMPORARY}*"))


def _remove(candidates: Iterator[Path]) -> None:
    for tmp in candidates:  # atomic_path's names: the file's, TEMPORARY, 16 random hex digits
        if tmp.is_file() and len(tmp.name.rpartition(TEMPORARY)[2]) == 16:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; on success it replaces `path`.

    The temporary's name carries a random token, so processes on hosts sharing a disk
    never collide (a pid would).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TEMPORARY}{secrets.token_hex(8)}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: Buffer | list[Buffer]) -> None:
    """Write `data` (or buffers back to back, without joining them) as the whole of `path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for piece in data if isinstance(data, list) else [data]:
            f.write(piece)


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}
"""What `os.link` raises on a file system without hard links (some FUSE and SMB mounts)."""


def create_atomic(path: str | Path, data: Buffer) -> bool:
    """Write `data` as `path` unless `path` exists: True when this call made it. Exclusive, so the
    first of racing writers wins, and whole at once (a hard link of a finished temporary; where
    the file system has no hard links, e.g. some FUSE mounts, an O_EXCL write that a kill can tear)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TEMPORARY}{secrets.token_hex(8)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        fsync_file(tmp)
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        return _create_in_place(path, data)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def _create_in_place(path: Path, data: Buffer) -> bool:
    """`create_atomic` without a hard link: exclusive still, but a kill mid-write leaves a part."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    return True


STAGING = ".partial-"
"""The prefix of `staged_files`' temporary folder inside the folder it fills."""


@contextlib.contextmanager
def staged_files(folder: str | Path, replaces: Sequence[str], last: str) -> Iterator[Path]:
    """A temporary folder inside `folder` for a new set of files. On success the old set (the
    names or globs `replaces`) is removed, `last` first, and the new files are moved in, `last`
    at the end: `folder` holds the old set whole until the new one is, and a reader that finds
    `last` finds the rest. On failure (an error, SIGTERM) the new files go and the old stay."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for killed in folder.glob(f"{STAGING}*"):  # what a SIGKILL left mid-way
        shutil.rmtree(killed, ignore_errors=True)
    staging = folder / f"{STAGING}{secrets.token_hex(8)}"
    staging.mkdir()
    try:
        yield staging
        old = [folder / last, *(path for pattern in replaces for path in folder.glob(pattern))]
        for path in dict.fromkeys(old):
            path.unlink(missing_ok=True)
        new = sorted(staging.iterdir(), key=lambda path: path.name == last)
        for path in new:
            os.replace(path, folder / path.name)
        fsync_dir(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
