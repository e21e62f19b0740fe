"""Write the README's generated parts: the configuration reference and the benchmark figures.

    python scripts/config_reference.py          # rewrite README.md in place
    python scripts/config_reference.py --check  # exit 1 if README.md is out of date (a test runs this)

The reference comes from the typed configs themselves (each field's type, default and the
docstring under it, via `kukla.config.field_docs`), the same text `--help` prints, so the
README cannot document a flag that does not exist. The figures are copied from
benchmarks/RESULTS.md, whose owners keep them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kukla.cli.app import FinalizeConfig, ImportConfig, InfoConfig, VerifyConfig  # noqa: E402
from kukla.cli.options import default_text, type_name  # noqa: E402
from kukla.config import Setting, field_types, settings  # noqa: E402
from kukla.pipeline.evaluate.config import EvaluateConfig  # noqa: E402
from kukla.pipeline.harvest.config import HarvestConfig  # noqa: E402
from kukla.pipeline.run import DemoConfig, RunConfig  # noqa: E402
from kukla.pipeline.train.config import TrainConfig  # noqa: E402

README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

#: (command, config, positional arguments, section of a `kukla run` file)
COMMANDS: list[tuple[str, type, tuple[str, ...], str | None]] = [
    ("kukla harvest", HarvestConfig, ("output",), "[harvest]"),
    ("kukla train", TrainConfig, ("store",), "[[train]]"),
    ("kukla evaluate", EvaluateConfig, ("dictionaries",), "[evaluate]"),
    ("kukla run", RunConfig, (), "[run]"),
    ("kukla demo", DemoConfig, (), None),
    ("kukla store info", InfoConfig, ("path",), None),
    ("kukla store verify", VerifyConfig, ("path",), None),
    ("kukla store finalize", FinalizeConfig, ("path",), None),
    ("kukla store import", ImportConfig, ("out",), None),
]


def _default(setting: Setting) -> str:
    """The default column: empty where the meaning column already says what an unset setting does."""
    return (default_text(setting) or "").removeprefix("default: ")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


_HEADER = ["| flag (TOML key) | type | default | meaning |", "| --- | --- | --- | --- |"]


def _row(setting: Setting, arguments: tuple[str, ...]) -> str:
    if setting.key in arguments:
        name = f"`{setting.key.upper()}` (argument; `{setting.key}`)"
    else:
        name = f"`{setting.flag}` (`{setting.key}`)"
    return f"| {name} | {_cell(type_name(setting.type))} | {_cell(_default(setting))} | {_cell(setting.doc)} |"


def command_table(command: str, cls: type, arguments: tuple[str, ...], section: str | None) -> str:
    """One command's settings: flag (TOML key), type, default, and what it means; a table per section."""
    where = f" · `kukla run` section `{section}`" if section else ""
    lines = [f"#### `{command}`{where}", "", _cell(cls.__doc__ or ""), "", *_HEADER]
    nested: dict[str, list[Setting]] = {}
    for setting in settings(cls):
        if len(setting.path) == 1:
            lines.append(_row(setting, arguments))
        else:
            nested.setdefault(setting.path[0], []).append(setting)
    types_ = field_types(cls)
    for name, members in nested.items():
        table = f"`[{section.strip('[]')}.{name}]`" if section else f"`{name} = {{…}}`"
        lines += ["", f"Section `{name}`: TOML table {table}, or dotted keys such as `{members[0].key} = …`. "
                      + _cell(types_[name].__doc__ or ""), "", *_HEADER, *(_row(s, arguments) for s in members)]
    return "\n".join(lines)


def reference() -> str:
    """The whole generated configuration reference (Markdown)."""
    intro = ("Generated from the typed configs by `scripts/config_reference.py` (a test keeps it in "
             "step). Every command also reads the same settings from `--config FILE.toml`; flags "
             "override the file, which overrides the defaults. `harvest`, `train` and `evaluate` "
             "read their own section (`[harvest]`, `[train]`, `[evaluate]`), so a `kukla run` file "
             "serves them too; one with several `[[train]]` runs is refused by `kukla train` "
             "(use `kukla run FILE --stages train`). List settings take `a,b` or a "
             "repeated flag; booleans take `--x/--no-x`. Settings that belong together form a section "
             "(`dataset`, `toy`, `absorption`, `downstream`, `wandb`): a TOML table (`[harvest.toy]`) or "
             "dotted keys (`toy.dim = 64`), flags named by the path (`--toy-dim`). A section's main "
             "setting, its `enabled` switch or its `name`, goes by the section's own name: "
             "`--no-absorption` or `absorption = false`, `--dataset X` or `dataset = \"X\"`. Every dtype "
             "is a `model_dtype` (what the model runs in) or a `store_dtype` (what a store holds). The "
             "keys of earlier versions (`toy_dim`, `dataset_subset`, `require_downstream`, `dtype`) are "
             "refused with the key to write instead.")
    return "\n\n".join([intro, *(command_table(*row) for row in COMMANDS)])


def results() -> str:
    """benchmarks/RESULTS.md without its title, its sections one level down."""
    if not RESULTS.exists():
        return "_No benchmark figures yet: see `benchmarks/`._"
    text = RESULTS.read_text().strip()
    text = re.sub(r"\A# [^\n]*\n+", "", text)
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)


def _replace(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {start} … {end} markers")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)


def generated_readme(text: str) -> str:
    """README text with its generated parts brought up to date."""
    return _replace(_replace(text, "config-reference", reference()), "benchmark-results", results())


def main(argv: list[str]) -> int:
    current = README.read_text()
    wanted = generated_readme(current)
    if "--check" in argv:
        if current != wanted:
            print("README.md is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
