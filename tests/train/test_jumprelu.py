"""JumpReLU trains through `kukla train`: its learned thresholds bring the L0 down to the target, and
the directory it writes loads in SAELens with the codes our encode gives."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import HOOK
from sae_lens import SAE
from typer.testing import CliRunner

from kukla.cli.app import app
from kukla.pipeline.dictionary import load_dictionary
from kukla.storage import open_store


def test_jumprelu_training_brings_l0_down_to_the_target_and_saves_for_saelens(store: Path, tmp_path: Path) -> None:
    # bandwidth 0.05, not the default 0.001: a 400-step toy run needs more pre-activations in the kernel's window
    result = CliRunner().invoke(app, [
        "train", str(store), "--out", str(tmp_path), "--hook", HOOK, "--activation", "jumprelu", "--prefixes", "none",
        "--width", "64", "--target-l0", "4", "--l0-control-rate", "0.05", "--bandwidth", "0.05", "--lr", "0.01",
        "--tokens", "102400", "--batch-size", "256", "--log-every", "20", "--threads", "1"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    l0 = [line["l0"] for line in lines if "l0" in line]  # the last line is the summary
    assert max(l0[:5]) > 15, l0  # θ starts at 0.001: about half the latents fire
    assert abs(sum(l0[-3:]) / 3 - 4) < 1.5, l0
    sae = SAE.load_from_disk(tmp_path / "jumprelu-w64-s0")
    ours = load_dictionary(tmp_path / "jumprelu-w64-s0")
    assert type(sae).__name__ == "JumpReLUSAE"
    x = open_store(store).read(HOOK, 0, 512).float()
    with torch.no_grad():
        codes = ours.encode(x)
        assert 1 < float((codes > 0).sum(1).float().mean()) < 10
        torch.testing.assert_close(sae.encode(x), codes, rtol=1e-5, atol=1e-5)
