"""benchmarks/gpu.sh stays runnable: its CPU dry run prints every train figure it will print on a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_script_dry_run_prints_the_train_and_harvest_figures_and_names_the_rest(tmp_path: Path) -> None:
    """The harvest part runs every way, SAELens' too, on a tiny GPT-2 loaded by name from a Hub cache built
    on the spot, in bf16 (which SAELens cannot store): the path the GPU run takes with Gemma-2-2B's shape."""
    run = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    logged = (tmp_path / "gpu_figures.txt").read_text()
    harvest = ["built gpt2 with random bf16 weights", "model dtype bfloat16", "× bare"] + ["× SAELens"] * bool(importlib.util.find_spec("sae_lens"))
    for figure in (*harvest, "kukla / SAELens", "sparse / dense", "encoder matmuls", "Matryoshka step cost / plain BatchTopK",
                   "data wait", "store_bench.py --rows 65536", "--phase read --device cuda", "harvest_bench.py --shape gemma-2-2b", "--device cuda --model-dtype bfloat16",
                   "kukla demo --device cuda"):
        assert figure in logged, figure


def test_gpu_script_skips_a_part_whose_modules_are_missing_at_once(tmp_path: Path) -> None:
    """A bare GPU image (no zarr) costs the session seconds and one line per part, not a traceback per part."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "zarr.py").write_text("raise ImportError('not on this image')\n")
    run = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(hide)}, timeout=120)
    logged = (tmp_path / "gpu_figures.txt").read_text()
    assert run.returncode == 1, logged
    assert "train step (tiny, CPU): skipped, missing here: zarr" in logged
    assert "would skip (missing here: zarr), not run: python3 benchmarks/store_bench.py" in logged
    assert "Traceback" not in run.stdout + run.stderr
