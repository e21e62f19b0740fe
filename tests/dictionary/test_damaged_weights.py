"""Damaged dictionary weights are refused on load, never scored: ours by the SHA-256 in
kukla.json, plain SAELens directories by their NaN/inf weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kukla.errors import KuklaError
from kukla.pipeline.dictionary import Dictionary, DictionaryConfig, load_dictionary, save_dictionary


def _saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    d = Dictionary(DictionaryConfig(d_in=12, width=40, k=3.0, arch="topk"))
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return save_dictionary(d, tmp_path / "dict", {"hooks": {"input": "blocks.0.hook_resid_post"}})


def test_flipped_bytes_in_our_weights_are_refused_by_their_checksum(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    assert len(json.loads((directory / "kukla.json").read_text())["weights_sha256"]) == 64
    load_dictionary(directory)  # sound: loads
    weights = directory / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x40  # one exponent bit of one float: still a valid safetensors file
    weights.write_bytes(bytes(data))
    load_file(str(weights))  # the file itself still parses: only the checksum can tell
    with pytest.raises(KuklaError, match="is damaged: its SHA-256 differs"):
        load_dictionary(directory)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_plain_saelens_directory_with_nonfinite_weights_is_refused(tmp_path: Path, bad: float) -> None:
    directory = _saved(tmp_path)
    (directory / "kukla.json").unlink()  # now a plain SAELens directory: no checksum to check
    weights = load_file(str(directory / "sae_weights.safetensors"))
    load_dictionary(directory)
    weights["W_dec"][3, 5] = bad
    save_file(weights, str(directory / "sae_weights.safetensors"))
    with pytest.raises(KuklaError, match="'W_dec' holds NaN or inf"):
        load_dictionary(directory)
