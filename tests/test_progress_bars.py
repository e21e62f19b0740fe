"""Every long step of a run shows a progress bar by name, or a line saying what it does.

A step silent for minutes makes a batch job's log look hung: these are the steps that grow with
the data (rows, windows, latents, words, bytes) and that a demo-sized run already passes through,
each checked by its bar's name in a real run's stderr."""

from __future__ import annotations

import itertools
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli import kukla
from tests.harvest.conftest import build_tiny_model_dir, write_texts
from tests.stores import write_store

ROOT = Path(__file__).parents[1]
MATRYOSHKA, PLAIN = "matryoshka-batchtopk-w64-k4-s0", "batchtopk-w64-k4-s0"
# 16 steps of two dictionaries: a periodic checkpoint (step 8) and the last
TRAIN = "width = [64], k = [4], tokens = 4096, batch_size = 256, init_tokens = 512, calibration_tokens = 512, " \
        "checkpoint_every = 8"


def run_file(out: Path, model: Path, texts: Path) -> str:
    """Harvest the tiny model's text, train a Matryoshka and a plain BatchTopK, evaluate both."""
    return f"""\
train = [{{arch = "matryoshka-batchtopk", {TRAIN}}}, {{arch = "batchtopk", {TRAIN}}}]

[run]
out = "{out}"
device = "cpu"

[harvest]
model = "{model}"
dataset = "{texts}"
hook = ["resid_post:1"]
context_size = 32
tokens = 3000
holdout_rows = 800
store_dtype = "float32"

[evaluate]
downstream.contexts = 4
downstream.batch_size = 4
"""


def bar_names(stderr: str) -> set[str]:
    """The names of the bars drawn on stderr (what comes before a bar's ': NN%|')."""
    return {m.group(1) for piece in re.split(r"[\r\n]", stderr) if (m := re.match(r"(.+?): +\d+%\|", piece))}


@pytest.mark.slow
def test_every_step_that_grows_with_the_data_shows_its_bar_in_a_whole_run(tmp_path: Path) -> None:
    # 15 three-letter words for every first letter, so the absorption probes have every letter to fit
    words = ["".join(p) for p in itertools.product(string.ascii_lowercase, "aeiou", "nst")]
    model = build_tiny_model_dir(tmp_path / "model", n_ctx=256, words=words)  # the spelling prompt: ~130 tokens
    texts = write_texts(tmp_path / "texts.jsonl", n_docs=400)  # text beyond the harvest, for downstream windows
    (tmp_path / "run.toml").write_text(run_file(tmp_path / "run", model, texts))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "kukla", "run", str(tmp_path / "run.toml")], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    bars = bar_names(run.stderr)
    expected = {
        "windows 1/2 token ids", "windows 2/2 rows",  # finalize
        f"threshold calibration ({MATRYOSHKA})", f"threshold calibration ({PLAIN})",
        "checkpoint step 8", "checkpoint step 16",  # a periodic one and the last
        "downstream windows (tokenizing)",
        *(f"{step} ({name})" for name in (MATRYOSHKA, PLAIN)
          for step in ("absorption probes", "decoder cosines", "logit lens", "context shading",
                       "browser pages")),
        f"matching ({MATRYOSHKA} → {PLAIN})", f"matching ({PLAIN} → {MATRYOSHKA})", "contexts (decoding)",
    }
    assert expected <= bars, sorted(expected - bars)
    lines = run.stderr.splitlines()
    for line in (f"loading model {model} (cpu, float32)", "writing the report to"):  # no bar can follow these
        assert any(line in text for text in lines), line


def test_verifying_a_store_still_being_written_shows_a_bar_over_its_segments(tmp_path: Path) -> None:
    store = write_store(tmp_path / "s.zarr", {"blocks.0.hook_resid_post": np.ones((300, 4), np.float32)},
                        segments=3, finalize=False)
    code, output = kukla("store", "verify", store)
    assert code == 0, output
    assert "verify (segments)" in bar_names(output), output
