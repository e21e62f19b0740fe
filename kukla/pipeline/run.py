"""`kukla run CONFIG.toml`: harvest → train → evaluate from one file, as one batch job.

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
`--stages train`; a `[harvest]` section still says where the store is when harvest is
not among them.

Rerunning the same file picks up where the last run stopped: harvest resumes from its
journal (a finished store is kept), train resumes from its latest checkpoint
(`resume = true` is the default here), and evaluate runs again.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kukla.config import from_dict, read_toml, to_dict
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
    """Stages to run, in pipeline order; a stage left out must not be needed by a later one without a path."""
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
    # A [harvest] section is read even when harvest does not run: it says where the store is.
    harvest = _harvest_config(data["harvest"], run, source) if "harvest" in data else None
    train = _train_configs(data.get("train", []), run, harvest, source) if "train" in run.stages else []
    evaluate = None
    if "evaluate" in run.stages:
        evaluate = _evaluate_config(data["evaluate"], run, harvest, train, source)
    return Pipeline(run=run, harvest=harvest if "harvest" in run.stages else None, train=train, evaluate=evaluate)


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
