"""A store at an fsspec URL trains and evaluates from the CLI exactly as the same store on a local path."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from conftest import HOOK
from safetensors.torch import load_file
from stores import write_store

from tests.cli import kukla

FLAGS = ["--hook", HOOK, "--arch", "batchtopk", "--width", "64", "--k", "4", "--batch-size", "128",
         "--tokens", str(128 * 8), "--checkpoint-every", "0", "--threads", "1", "--device", "cpu"]


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_train_and_evaluate_read_a_store_at_an_fsspec_url(tmp_path: Path, scheme: str) -> None:
    """A URL was once turned into a local path (`s3://b/s` → `./s3:/b/s`) and refused as missing."""
    local = write_store(tmp_path / "local.zarr", 1024, holdout_rows=256)
    url = (f"memory://kukla-test-{uuid.uuid4().hex}/s.zarr" if scheme == "memory"
           else f"file://{tmp_path}/url.zarr")
    write_store(url, 1024, holdout_rows=256)
    results = {}
    for name, store in (("local", local), ("url", url)):
        code, output = kukla("train", store, *FLAGS, "--out", tmp_path / name)
        assert code == 0, output
        [member] = [p for p in (tmp_path / name).iterdir() if p.is_dir() and p.name != "checkpoints"]
        code, output = kukla("evaluate", member, "--store", store, "--out", tmp_path / f"report-{name}",
                             "--device", "cpu", "--no-downstream", "--no-absorption")
        assert code == 0, output
        metrics = json.loads((tmp_path / f"report-{name}" / "metrics.json").read_text())
        results[name] = (load_file(member / "sae_weights.safetensors"),
                         metrics["dictionaries"][member.name]["reconstruction"])
    (weights, scores), (url_weights, url_scores) = results["local"], results["url"]
    assert weights.keys() == url_weights.keys()
    assert all(weights[k].equal(url_weights[k]) for k in weights)
    assert scores == url_scores
