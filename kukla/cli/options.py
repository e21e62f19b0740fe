"""Typer commands generated from a stage's config dataclass.

One setting, one flag: the flag's help is the field's docstring, and the values go
through `kukla.config.from_dict`, the same path a TOML file or the Python API takes.
A section's settings get flags named by their path (`toy.dim` → `--toy-dim`); an old
spelling in the class's `RENAMED` table is a hidden flag that from_dict refuses naming the new one.
Precedence: field default < `--config FILE` < flags given on the command line.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from pathlib import Path
from typing import Any, Callable, Literal, Optional, TypeVar, get_args, get_origin

import typer
from rich.markup import escape

from kukla.config import (COMMAND_LINE, Bytes, Setting, _strip_optional, field_types, from_dict, read_toml,
                          section_table, settings)
from kukla.errors import EXIT_SIGTERM, KuklaError, Preempted, stop_on_sigterm

C = TypeVar("C")
F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn a KuklaError into one line on stderr and exit status 2 (no traceback); SIGTERM into 143,
    from the command's first instant (its imports and model load take seconds) until a stage
    takes SIGTERM over (training checkpoints first)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with stop_on_sigterm():
                return fn(*args, **kwargs)
        except KuklaError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except Preempted as exc:
            typer.echo(f"stopped: {exc}", err=True)
            raise typer.Exit(EXIT_SIGTERM) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: committed work is kept; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _cli_type(tp: Any) -> Any:
    """The type Typer parses; lists arrive as repeatable text and are split on commas."""
    origin = get_origin(tp)
    if origin in (list, tuple):
        return list[str]
    if origin is Literal or origin is dict:
        return str
    return tp if tp in (int, float, bool, str, Path) else str


def type_name(tp: Any) -> str:
    """A setting's type as a reader names it: the README reference's column and `--help`'s metavar."""
    tp, optional = _strip_optional(tp)
    origin = get_origin(tp)
    if origin is Literal:
        text = " | ".join(str(a) for a in get_args(tp))
    elif origin in (list, tuple):
        (item,) = get_args(tp)[:1] or (str,)
        text = f"list of {type_name(item)}"
    elif origin is dict:
        text = "table"
    else:
        text = {Path: "path", str: "text", int: "int", float: "float", bool: "bool", Bytes: "size"}.get(
            tp, getattr(tp, "__name__", str(tp)))
    return text + (" or none" if optional else "")


_SAYS_UNSET = re.compile(r"(?i:\bdefaults?\b)|\bNone\b")
"""A doc that says what an unset setting does: `Default: F/32 …`, `defaults to RANK`, `None: never`."""


def default_text(setting: Setting) -> str | None:
    """`default: 64` or `required`, as --help and the README state it; None for a setting whose
    default is None and whose doc already says what that does, so neither says it twice."""
    field = setting.field
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if value is None and _SAYS_UNSET.search(setting.doc):
        return None
    if isinstance(value, (list, tuple)):
        value = ",".join(map(_number, value)) or "none"
    return f"default: {_number(value)}"


def _number(value: Any) -> str:
    """A float as written (64, 0.5), not as Python prints it (64.0)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _put(cls: type, data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set `data[a][b] = value` for the path (a, b), making the section tables a flag needs
    (a file's `dataset = "X"` becomes `{name = "X"}` when `--dataset-split` joins it)."""
    for name in path[:-1]:
        cls = field_types(cls)[name]
        data[name] = {} if data.get(name) is None else section_table(name, cls, data[name])
        data = data[name]
    data[path[-1]] = value


def config_command(
    cls: type[C],
    run: Callable[[C], Any],
    *,
    arguments: tuple[str, ...] = (),
    section: str | None = None,
) -> Callable[..., Any]:
    """A Typer command whose parameters are the settings of `cls`; it calls `run(config)`."""
    by_param: dict[str, Setting] = {"__".join(s.path): s for s in settings(cls)}
    params = []
    for param, setting in by_param.items():
        tp, _ = _strip_optional(setting.type)
        choices = f" [{'|'.join(map(str, get_args(tp)))}]" if get_origin(tp) is Literal else ""
        stated = default_text(setting)
        help_text = escape(setting.doc + choices + (f" ({stated})" if stated else ""))  # [a|b], [rows, width] are text
        metavar = "choice" if choices else type_name(setting.type)  # the choices follow the help text
        if setting.key in arguments:
            default = typer.Argument(None, help=help_text, show_default=False, metavar=setting.key.upper())
        elif tp is bool:
            default = typer.Option(None, f"{setting.flag}/--no-{setting.flag[2:]}", help=help_text, show_default=False)
        else:
            default = typer.Option(None, setting.flag, help=help_text, show_default=False, metavar=metavar)
        params.append(inspect.Parameter(param, inspect.Parameter.KEYWORD_ONLY,
                                        default=default, annotation=Optional[_cli_type(tp)]))
    for old in getattr(cls, "RENAMED", {}):
        params.append(inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                        default=typer.Option(None, "--" + old.replace("_", "-"), hidden=True)))
    where = escape(f" under [{section}] (a `kukla run` file works)") if section else ""
    params.append(inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
        default=typer.Option(None, "--config", help=f"TOML file with these settings{where}; flags override it."),
    ))

    def command(**kwargs: Any) -> Any:
        config_path = kwargs.pop("config")
        data = read_toml(config_path, section) if config_path else {}
        if config_path and section is not None:
            source = f"{config_path} [{section}]"
        else:
            source = str(config_path or COMMAND_LINE)
        for param, value in kwargs.items():
            if value is not None and value != [] and value != ():
                _put(cls, data, by_param[param].path if param in by_param else (param,), value)
        return run(from_dict(cls, data, source=source))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = inspect.getdoc(run)
    wrapped = friendly(command)
    wrapped.__signature__ = command.__signature__  # type: ignore[attr-defined]
    wrapped.config_class = cls  # type: ignore[attr-defined]  # lets the README reference find every command
    return wrapped
