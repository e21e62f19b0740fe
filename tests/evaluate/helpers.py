"""Helpers that write real stores and dictionary directories for the evaluate tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kukla.pipeline.dictionary import Dictionary, DictionaryConfig, save_dictionary
from tests.stores import write_store

HOOK = "blocks.0.hook_resid_post"
D = 8


def write_rows_store(path: Path, rows: np.ndarray, *, holdout_rows: int, hook: str = HOOK) -> Path:
    """A finalized float32 store of `rows` at one hook, with made-up token provenance."""
    return write_store(path, {hook: rows}, holdout_rows=holdout_rows, meta={"source": "test"})


def make_dictionary(path: Path, w_enc: torch.Tensor, w_dec: torch.Tensor, *, b_enc: torch.Tensor | None = None,
                    b_dec: torch.Tensor | None = None, levels: list[int] | None = None, hook: str = HOOK) -> Path:
    """A ReLU SAE with the given weights, saved as a dictionary directory."""
    d, width = w_enc.shape
    dictionary = Dictionary(DictionaryConfig(d_in=d, width=width, arch="relu", levels=levels))
    with torch.no_grad():
        dictionary.W_enc.copy_(w_enc)
        dictionary.W_dec.copy_(w_dec)
        dictionary.b_enc.copy_(b_enc if b_enc is not None else torch.zeros(width))
        dictionary.b_dec.copy_(b_dec if b_dec is not None else torch.zeros(d))
    return save_dictionary(dictionary, path, {"hooks": {"input": hook}})
