"""Shared fixtures. Tests run on CPU with real components: real Zarr stores on disk,
real TransformerLens models built from a config, real gloo process groups."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: torch's two intra-op threads stall on small matrices; one thread is faster here.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)
