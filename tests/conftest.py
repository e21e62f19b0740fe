"""Shared fixtures. Tests run on CPU with real components: real Zarr stores on disk,
real TransformerLens models built from a config, real gloo process groups."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

# Two cores: torch's two intra-op threads stall on small matrices; one thread is faster here.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def kukla_logger_as_found():
    """A CLI command run in-process configures the `kukla` logger (`show_logs`); the next test finds it as before."""
    logger = logging.getLogger("kukla")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture
def kukla_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The `kukla` logger's records from INFO up, taken from it directly: an in-process CLI test's
    `show_logs` may have stopped it propagating to caplog (`kukla_logger_as_found` undoes this)."""
    logger = logging.getLogger("kukla")
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    return caplog


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 1 MiB file system (tmpfs; needs root: skipped otherwise), unmounted afterwards;
    `mount -o remount,size=…` grows it (a user freeing space)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
