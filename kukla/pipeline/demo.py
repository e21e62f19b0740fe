"""`kukla demo`: the whole pipeline on the embedded default, with nothing to download but packages.

The demo is a `kukla run` file with a few blanks filled: Gemma-3-270m (from the package
index), English Wikipedia lead paragraphs (from the package index), the residual stream
after block 9 of 18, and a Matryoshka BatchTopK trained next to a plain BatchTopK of the
same width and k, so the report shows what the nested levels buy. The filled-in file is
written to `<out>/pipeline.toml`: edit it and run it with `kukla run` to go further.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kukla.config import DEFAULT_DEVICE, read_toml
from kukla.errors import ConfigError
from kukla.pipeline.demo_text import write_demo_text
from kukla.pipeline.run import build_pipeline, run_pipeline

DEMO_TOML = """\
# kukla demo: written by `kukla demo`; rerun or edit it with `kukla run {out}/pipeline.toml`.
[run]
out = "{out}"
device = "{device}"

[harvest]
model = "google/gemma-3-270m"
dataset = "{text}"
hook = ["resid_post:9"]
context_size = 128
tokens = {tokens}
batch_size = 8
segment_windows = 32
# A tenth of the rows held out: enough for evaluation and threshold calibration to mean something.
holdout_rows = {holdout_rows}

# Two training runs over the same store: Matryoshka BatchTopK with levels
# 64/192/448/960/2048 (F·1/32, 3/32, 7/32, 15/32, 1), and plain BatchTopK. 2,048 latents, not
# 4,096: 120k training tokens leave each latent ~1,900 firings instead of ~940. The dead-latent
# window is the default tenth of the run (aux-k engages), inference caps each token at 4·k latents.
{train_tables}
# CE/KL splice on 4 windows: each pass ends in Gemma's 262k-token unembedding, the
# costliest step of the demo on a CPU (the report warns that 508 tokens are few).
[evaluate]
downstream.contexts = 4
downstream.batch_size = 2
"""

TRAIN_TABLE = """\
[[train]]
arch = "{arch}"
width = [2048]
k = [32]
tokens = {train_tokens}
batch_size = 1024
init_tokens = 4096
calibration_tokens = 4096
checkpoint_every = 0
"""
DEMO_ARCHS = ("matryoshka-batchtopk", "batchtopk")


@dataclass
class DemoConfig:
    """The demo's few choices; everything else is in the run file it writes."""

    out: Path = Path("kukla-demo")
    """Folder for the demo's text, store, dictionaries and report."""
    device: str = DEFAULT_DEVICE
    """Torch device for all three stages: auto (a GPU if one is visible, else cpu), cpu, cuda, cuda:1."""
    tokens: int = 40_000
    """Tokens to harvest; training makes several passes over them."""
    epochs: int = 3
    """Passes the training makes over the harvested tokens."""

    def __post_init__(self) -> None:
        if self.tokens < 4096:
            raise ConfigError("tokens", "must be at least 4096 (the demo's batch and initialisation sizes)")
        if self.epochs < 1:
            raise ConfigError("epochs", "must be at least 1")


def write_demo_pipeline(config: DemoConfig) -> Path:
    """Write the demo's text and its filled-in run file; returns the run file."""
    out = Path(config.out).absolute()
    text = write_demo_text(out / "text" / "wikipedia-en.jsonl")
    train_tokens = config.tokens * config.epochs
    tables = "\n".join(TRAIN_TABLE.format(arch=arch, train_tokens=train_tokens) for arch in DEMO_ARCHS)
    toml = DEMO_TOML.format(out=out.as_posix(), device=config.device, text=text.as_posix(),
                            tokens=config.tokens, holdout_rows=config.tokens // 10,
                            train_tables=tables)
    path = out / "pipeline.toml"
    path.write_text(toml)
    return path


def demo(config: DemoConfig) -> Path:
    """Run the demo end to end; returns the report's folder."""
    path = write_demo_pipeline(config)
    report = run_pipeline(build_pipeline(read_toml(path), source=str(path)))
    assert report is not None  # the demo's run file always evaluates
    return report
