"""The one-way dependencies docs/ARCHITECTURE.md promises: cli → pipeline → {dictionary, storage}."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KUKLA = Path(__file__).parents[1] / "kukla"


def _imports(package: str) -> dict[str, set[str]]:
    """Every module under kukla/<package> → the modules it imports (lazy imports included)."""
    found: dict[str, set[str]] = {}
    for path in (KUKLA / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(KUKLA))] = names
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("storage", ("kukla.pipeline", "kukla.cli", "typer")),
    ("pipeline", ("kukla.cli", "typer")),
    ("pipeline/evaluate", ("kukla.pipeline.harvest",)),  # the store, not harvest's code, gives it contexts
    ("pipeline/dictionary", ("kukla.storage", "kukla.pipeline.harvest", "kukla.pipeline.train",
                             "kukla.pipeline.evaluate")),
])
def test_a_lower_layer_never_imports_a_higher_one(package: str, forbidden: tuple[str, ...]) -> None:
    offences = {module: sorted(n for n in names if n.startswith(forbidden))
                for module, names in _imports(package).items()}
    assert not {m: n for m, n in offences.items() if n}
