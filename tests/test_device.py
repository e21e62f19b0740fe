"""A --device torch cannot use here (a typo, or a GPU this machine lacks) is refused in one line by
every stage as it starts, before it loads a model or creates an output, not a torch traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.cli import kukla, one_line_error

_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _stage(name: str, tmp_path: Path, device: str) -> list[str]:
    """A command line of the stage whose inputs need not exist: the device is checked first."""
    missing = tmp_path / "missing"
    out = tmp_path / "out"
    return {
        "harvest": ["harvest", out, "--model", missing, "--dataset", missing / "t.txt", "--hook", "resid_post:0"],
        "train": ["train", missing, "--hook", "resid_post:0", "--out", out],
        "evaluate": ["evaluate", missing, "--store", missing, "--out", out],
    }[name] + ["--device", device]


@pytest.mark.parametrize("stage", ["harvest", "train", "evaluate"])
def test_a_device_that_is_not_a_torch_device_is_one_line(tmp_path: Path, stage: str) -> None:
    one_line_error(*kukla(*_stage(stage, tmp_path, "gpu")), "device", "'gpu' is not a torch device", "cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", ["harvest", "train", "evaluate"])
def test_a_gpu_this_machine_lacks_is_one_line(tmp_path: Path, stage: str) -> None:
    device = f"cuda:{_GPUS}"  # one past the last GPU torch sees (cuda:0 on a CPU-only machine)
    one_line_error(*kukla(*_stage(stage, tmp_path, device)), "device", f"torch sees {_GPUS} GPU(s)", "give cpu")
    assert not (tmp_path / "out").exists()
