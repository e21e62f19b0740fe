"""Typed configuration shared by the CLI, TOML files and the Python API.

Each stage has one dataclass. Every field carries a docstring right under it; those
docstrings become the CLI's `--help`, and the README's configuration reference. The
CLI, a TOML file and Python all go through `from_dict`, so validation happens once,
and every error names the field it is about. A field whose type is itself a dataclass
is a *section* (`toy`, `absorption`): a `[harvest.toy]` table or `toy.dim = 64` in TOML,
`HarvestConfig(toy=ToyConfig(dim=64))` in Python, `--toy-dim 64` on the command line,
and its errors name the path (`toy.dim: must be positive`). A section's main setting, its
`enabled` switch or its `name`, goes by the section's own name: `--dataset X` and
`dataset = "X"` fill `dataset.name`, `--no-absorption` and `absorption = false` clear
`absorption.enabled`. A key that was renamed is refused naming its new key: a section moved
there is found by its words (`toy_dim` → `toy.dim`), any other rename is listed in the
class's `RENAMED` table (`dtype` → `model_dtype`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import os
import re
import textwrap
import tomllib
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from kukla.errors import ConfigError, KuklaError

if typing.TYPE_CHECKING:
    import torch

C = TypeVar("C")

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


class Bytes(int):
    """A size in bytes, the one type of every memory budget: written `2GiB`, `512MB`, `1e9` or a byte count."""

    @classmethod
    def parse(cls, name: str, value: Any) -> Bytes:
        match = re.fullmatch(r"\s*([0-9.eE+_]+)\s*([a-zA-Z]*)\s*", str(value))
        if isinstance(value, bool) or not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(name, f"cannot read {value!r} as a size: use e.g. 2GiB, 512MB or a byte count")
        try:
            return cls(float(match.group(1).replace("_", "")) * _UNITS[match.group(2).lower()])
        except ValueError:
            raise ConfigError(name, f"cannot read {value!r} as a size: use e.g. 2GiB, 512MB or a byte count") from None

    def __str__(self) -> str:
        for unit in ("TiB", "TB", "GiB", "GB", "MiB", "MB", "KiB", "kB"):  # the largest that divides it
            if self and self % _UNITS[unit.lower()] == 0:
                return f"{self // _UNITS[unit.lower()]}{unit}"
        return f"{int(self)}B"


StoreDtype = Literal["bfloat16", "float16", "float32"]
"""The dtype a store holds activations in: bfloat16 halves float32's bytes; float16 refuses values that overflow."""

ModelDtype = Literal["bfloat16", "float16", "float32"]
"""The dtype a model runs in (harvest's forward pass, evaluate's downstream metrics and absorption)."""


def torch_dtype(name: StoreDtype | ModelDtype) -> torch.dtype:
    """The torch dtype a `StoreDtype` or `ModelDtype` names (their spellings are torch's own)."""
    import torch  # only when a dtype is used, not at CLI start

    return getattr(torch, name)


DEFAULT_MEMORY_BUDGET = Bytes(2 << 30)
"""Every shuffle's memory budget default (harvest's finalize, `kukla store finalize` and `import`)."""

DEFAULT_DEVICE = "auto"
"""Every stage's device default: a GPU when one is visible, else the CPU."""


def resolve_device(spec: str) -> str:
    """`auto` → cuda if torch sees a GPU, else cpu; under torchrun a bare `cuda` → cuda:LOCAL_RANK."""
    if spec == "auto":
        import torch  # only when a stage resolves its device, not at CLI start

        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and "LOCAL_RANK" in os.environ:
        spec = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return spec


def usable_device(spec: str) -> str:
    """`resolve_device(spec)`, refused in one line when torch cannot run on it here (a typo such as
    gpu, cuda on a CPU-only build or GPU-less machine): checked as a stage starts, not when its config
    is read, since a run file's stages may run on other machines."""
    import torch

    spec = resolve_device(spec)
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError("device", f"{spec!r} is not a torch device: give auto, cpu, cuda, cuda:N or mps") from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise ConfigError("device", f"{spec} asked for, but torch sees {gpus} GPU(s) here: give cpu or auto, or run "
                                    "where a GPU is visible (with a CUDA build of torch)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", "mps asked for, but torch sees no Apple GPU here: give cpu or auto")
    return spec


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (base classes included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, following in zip(body, body[1:] + [None]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(following.value.value)
    return docs


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _split_items(value: Any) -> list[Any]:
    """Lists come as TOML arrays, repeated flags, or comma-separated text: `32,64`."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[Any] = []
    for item in items:
        if isinstance(item, str):
            out.extend(part.strip() for part in item.split(",") if part.strip())
        else:
            out.append(item)
    return out


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert `value` to `tp`, or raise a ConfigError naming the field."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() == "none"):
        if optional:
            return None
        raise ConfigError(name, "a value is required")
    origin = get_origin(tp)
    try:
        if origin is Literal:
            choices = get_args(tp)
            if value not in choices:
                raise ConfigError(name, f"{value!r} is not one of {', '.join(map(str, choices))}")
            return value
        if origin in (list, tuple):
            (item_tp, *_) = get_args(tp) or (str,)
            items = [coerce(name, item_tp, v) for v in _split_items(value)]
            return items if origin is list else tuple(items)
        if origin is dict:
            if not isinstance(value, dict):
                raise ConfigError(name, f"expected a table, got {value!r}")
            return dict(value)
        if tp is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered in ("true", "1", "yes", "on"):
                    return True
                if lowered in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp in (int, float) and isinstance(value, bool):
            raise ConfigError(name, f"{str(value).lower()} is a boolean; give a number")
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str):
                return int(float(value)) if "e" in value.lower() else int(value.replace("_", ""))
            return int(value)
        if tp is float:
            return float(value)
        if tp is Path:
            return Path(value)
        if tp is Bytes:
            return Bytes.parse(name, value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(name, f"cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    return value


def is_section(tp: Any) -> bool:
    """Whether a field's type is a nested section of settings (a dataclass), not one value."""
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One leaf setting of a config, sections flattened: what a flag and a README row describe."""

    path: tuple[str, ...]
    """Field names from the top config down: ("toy", "dim")."""
    field: dataclasses.Field
    type: Any
    doc: str
    main: bool = False
    """Whether it is its section's main setting (see `main_field`)."""

    @property
    def key(self) -> str:
        """The TOML key (dotted inside a section): `toy.dim`."""
        return ".".join(self.path)

    @property
    def flag(self) -> str:
        """`--toy-dim`; a section's main setting is named after the section (`--absorption`, `--dataset`)."""
        path = self.path[:-1] if self.main else self.path
        return "--" + "-".join(path).replace("_", "-")


def main_field(section: type) -> str | None:
    """The setting a section's own name stands for: its `enabled` switch, else its `name`."""
    names = field_types(section)
    return next((name for name in ("enabled", "name") if name in names), None)


def settings(cls: type) -> list[Setting]:
    """Every leaf setting of a config class, in field order, each section's settings in its place."""
    docs, types_ = field_docs(cls), field_types(cls)
    out: list[Setting] = []
    for f in dataclasses.fields(cls):
        if is_section(types_[f.name]):
            main = main_field(types_[f.name])
            out += [dataclasses.replace(s, path=(f.name, *s.path), main=s.path == (main,))
                    for s in settings(types_[f.name])]
        else:
            out.append(Setting((f.name,), f, types_[f.name], docs.get(f.name, "")))
    return out


def _moved_to(key: str, types_: dict[str, Any]) -> str | None:
    """The section key an old flat key lives at now: `toy_dim` → `toy.dim`, `seed` → `absorption.seed`."""
    for section, tp in types_.items():
        if is_section(tp):
            inner = field_types(tp)
            rest = "_".join(word for word in key.split("_") if word != section)
            if rest in inner and not is_section(inner[rest]):
                return f"{section}.{rest}"
    return None


def section_table(name: str, tp: type, value: Any) -> dict[str, Any]:
    """A section's settings as a table: the table itself, or a plain value as its main setting."""
    if isinstance(value, dict):
        return value
    main = main_field(tp)
    if main is not None:
        return {main: value}
    example = dataclasses.fields(tp)[0].name
    raise ConfigError(name, f"is a section of settings, not {json.dumps(value, default=str)}: "
                            f"write {name}.{example} = … or a table {name} = {{{example} = …}}")


def _section(name: str, tp: type, value: Any, source: str) -> Any:
    """A section from a table (TOML, flags), its main setting, or an instance of its dataclass (Python)."""
    if isinstance(value, tp):
        return value
    return from_dict(tp, section_table(name, tp, value), source=source, path=f"{name}.")


COMMAND_LINE = "command line"
"""The `source` of settings given only as flags: errors about them need not name it."""


def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config", path: str = "") -> C:
    """Build and validate a config; unknown keys are refused with the key to use instead.

    `path` prefixes a section's field names (`toy.`), so every error names the full key.
    """
    types_ = field_types(cls)
    for key in data:
        name = key.replace("-", "_")
        if name in types_:
            continue
        moved = getattr(cls, "RENAMED", {}).get(name) or _moved_to(name, types_)
        if moved:
            flag = next(s.flag for s in settings(cls) if s.key == moved)
            raise KuklaError(f"{source}: setting {path + key!r} is now {path + moved!r}: write "
                             f"{moved} = {json.dumps(data[key], default=str)} (flag {flag})")
        near = difflib.get_close_matches(name, list(types_), n=1)
        hint = f" (did you mean {path + near[0]!r}?)" if near else ""
        raise KuklaError(f"{source}: unknown setting {path + key!r}{hint}")
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        tp = types_[name]
        values[name] = (_section(path + name, tp, value, source) if is_section(tp)
                        else coerce(path + key, tp, value))
    try:
        return cls(**values)
    except ConfigError as exc:  # a section validates itself; name the field from the top
        if not path:
            raise
        raise ConfigError(path + exc.field, exc.message) from None
    except TypeError as exc:  # a required field is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            where = "" if source == COMMAND_LINE else f" ({source})"
            raise ConfigError(path + missing[0], f"is required{where}") from None
        raise KuklaError(f"{source}: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/TOML-ready dict of a config (paths as strings, sections as tables)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if is_section(type(value)):
            return to_dict(value)
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def read_toml(path: Path, section: str | None = None) -> dict[str, Any]:
    """Read a TOML config file, optionally one `[section]` of it.

    A run file's `[[train]]` array counts as the section when it holds one table; with
    several, a single stage cannot choose, so `kukla run` is named instead.
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KuklaError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise KuklaError(f"config file {path} is not valid TOML: {exc}") from None
    if section is None:
        return data
    table = data.get(section)
    if isinstance(table, list) and all(isinstance(t, dict) for t in table):
        if len(table) > 1:
            raise KuklaError(f"config file {path} has {len(table)} [[{section}]] runs; --config reads one: "
                             f"run them all with `kukla run {path} --stages {section}`")
        table = table[0] if table else None
    if isinstance(table, dict):
        return table
    raise KuklaError(f"config file {path} has no [{section}] section; put this stage's settings under [{section}]")


def load_config(cls: type[C], path: Path, section: str | None = None, **overrides: Any) -> C:
    """Config from a TOML file, with keyword overrides on top (the Python API's entry)."""
    data = read_toml(path, section)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, data, source=str(path))
