"""An output folder that is a file is refused in one line before any work, whichever way a stage
starts: the Python API of train and evaluate, and `kukla run` (before its harvest writes anything)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kukla.errors import KuklaError
from kukla.pipeline.evaluate import EvaluateConfig, evaluate
from kukla.pipeline.train import train
from kukla.pipeline.train.config import TrainConfig
from tests.cli import kukla, one_line_error
from tests.pipeline.test_run import tiny_pipeline


@pytest.fixture
def file(tmp_path: Path) -> Path:
    path = tmp_path / "file"
    path.write_text("not a folder")
    return path


def test_the_python_api_refuses_an_out_that_is_a_file_before_opening_the_store(tmp_path: Path, file: Path) -> None:
    missing = tmp_path / "no-store.zarr"  # the output is checked first: the store's error would come later
    with pytest.raises(KuklaError, match=f"--out {file} is a file, not a folder"):
        evaluate(EvaluateConfig(dictionaries=[tmp_path], store=missing, out=file))
    with pytest.raises(KuklaError, match=f"--out {file} is a file, not a folder"):
        train(TrainConfig(store=missing, hook="blocks.0.hook_resid_post", out=file))
    assert file.read_text() == "not a folder" and not missing.exists()


@pytest.mark.parametrize("section", ["train", "evaluate"])
def test_kukla_run_refuses_an_out_that_is_a_file_before_harvesting(tmp_path: Path, file: Path, section: str) -> None:
    text = tiny_pipeline(tmp_path / "run")
    if section == "evaluate":
        text += f'out = "{file.as_posix()}"\n'
    else:  # the first [[train]] table writes into the file
        text = text.replace("[[train]]\n", f'[[train]]\nout = "{file.as_posix()}"\n', 1)
    config = tmp_path / "pipeline.toml"
    config.write_text(text)
    one_line_error(*kukla("run", config), f"[{section}] out {file} is a file, not a folder")
    assert not (tmp_path / "run").exists()  # nothing was harvested
    assert file.read_text() == "not a folder"
