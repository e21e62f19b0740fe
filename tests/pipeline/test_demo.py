"""`kukla demo` is a `kukla run` file: Gemma-3-270m at its middle residual stream, English text
from the package index, a Matryoshka BatchTopK beside a plain BatchTopK, one report.
(The full demo takes minutes on a CPU and runs by hand; its timing is in benchmarks/RESULTS.md.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kukla.config import read_toml
from kukla.errors import ConfigError
from kukla.pipeline.run import DemoConfig, build_pipeline, write_demo_pipeline


def test_demo_writes_a_run_file_for_the_embedded_model_and_both_dictionaries(tmp_path: Path) -> None:
    path = write_demo_pipeline(DemoConfig(out=tmp_path, device="cuda", tokens=8192, epochs=2))
    assert path == tmp_path / "pipeline.toml"
    pipeline = build_pipeline(read_toml(path), source=str(path))
    harvest = pipeline.harvest
    assert harvest is not None and pipeline.evaluate is not None
    assert harvest.model == "google/gemma-3-270m" and harvest.hook == ["resid_post:9"]  # block 9 of 18
    assert harvest.tokens == 8192
    assert [t.arch for t in pipeline.train] == ["matryoshka-batchtopk", "batchtopk"]
    assert len({(tuple(t.width), tuple(t.k), t.tokens) for t in pipeline.train}) == 1  # same size, same data
    assert all(t.hook == "blocks.9.hook_resid_post" and t.tokens == 2 * 8192 for t in pipeline.train)
    assert [p.name for p in pipeline.evaluate.dictionaries] == ["matryoshka-batchtopk-w2048-k32-s0",
                                                                 "batchtopk-w2048-k32-s0"]
    assert (pipeline.evaluate.downstream.contexts, pipeline.evaluate.downstream.batch_size) == (4, 2)
    # aux-k can engage: the dead-latent window is a tenth of the run, not 10M tokens
    assert all(t.dead_window == 2 * 8192 // 10 < t.tokens for t in pipeline.train)
    # --device reaches every stage: the same code path on a GPU.
    assert harvest.device == pipeline.evaluate.device == "cuda"
    assert all(t.device == "cuda" for t in pipeline.train)


def test_demo_text_is_english_wikipedia_from_the_package_index(tmp_path: Path) -> None:
    path = write_demo_pipeline(DemoConfig(out=tmp_path))
    text = Path(read_toml(path, "harvest")["dataset"])
    rows = [json.loads(line) for line in text.read_text(encoding="utf-8").splitlines()]
    assert len(rows) > 10_000
    assert all(row["text"].strip() for row in rows)
    words = sum(len(row["text"].split()) for row in rows)
    assert words > 500_000  # far more text than the demo harvests, so no window repeats
    assert sum(" the " in row["text"] for row in rows) > 0.9 * len(rows)


def test_demo_refuses_too_few_tokens_for_its_batches() -> None:
    with pytest.raises(ConfigError, match="tokens"):
        DemoConfig(tokens=100)
