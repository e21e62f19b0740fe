"""The batch-job examples in docker/ are real: every file parses, the images install what
CI installs, and every `kukla …` command line in them (and in the README) is accepted by
the CLI's own parser. There is no Docker engine here, so this is what can be checked."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import typer
import yaml

from kukla.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"

# Values of the variables that the batch system sets (the scripts' own `X=${X:-default}`
# give the rest). A variable with no value leaves `<unset $X>` behind, which fails the test.
BATCH_SYSTEM_VARIABLES = {
    "SLURM_ARRAY_TASK_ID": "0",
    "SLURM_ARRAY_TASK_COUNT": "4",
    "SLURM_NNODES": "2",
    "SLURM_JOB_ID": "1234",
    "HEAD_NODE": "node001",
}


# ---------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def exec_form(arguments: str) -> list[str]:
    """ENTRYPOINT/CMD must use the JSON (exec) form, so signals reach kukla directly."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))


def test_there_is_a_cpu_and_a_cuda_image() -> None:
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_parses_and_its_entrypoint_is_kukla(dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
    known = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "ENTRYPOINT", "CMD", "LABEL", "USER"}
    assert {kw for kw, _ in instructions} <= known
    keywords = [kw for kw, _ in instructions if kw != "ARG"]
    assert keywords[0] == "FROM"
    assert "RUN" in keywords
    (entrypoint,) = [args for kw, args in instructions if kw == "ENTRYPOINT"]
    assert exec_form(entrypoint) == ["kukla"]
    for kw, args in instructions:
        if kw == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which is not in the repo"


def _pip_requirements(command: str) -> list[str]:
    """The requirement arguments of every `pip install` in a shell command (options dropped)."""
    found: list[str] = []
    for part in re.split(r"&&|;", command):
        words = shlex.split(part)
        if words[:2] in (["pip", "install"], ["pip3", "install"]) or words[1:4] == ["-m", "pip", "install"]:
            start = words.index("install") + 1
            skip_next = False
            for word in words[start:]:
                if skip_next:
                    skip_next = False
                elif word in ("--index-url", "--extra-index-url", "-i", "-r", "-c"):
                    skip_next = True
                elif word != "-e" and not word.startswith("-"):
                    found.append(word)
    return found


def _readme_setup_lines() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md must open with a bash block holding the two set-up commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_cpu_image_installs_what_the_readme_and_ci_install() -> None:
    """CI runs the README's install commands; the CPU image runs the same requirements, so CI
    exercises the image's install steps without Docker (the image adds s3fs for s3:// paths)."""
    image = [req for kw, args in dockerfile_instructions(DOCKER / "Dockerfile.cpu") if kw == "RUN"
             for req in _pip_requirements(args)]
    first_line = _readme_setup_lines()[0]
    assert first_line.rstrip().endswith("kukla demo")
    readme = _pip_requirements(first_line)
    assert [r for r in image if r != "s3fs"] == readme


def test_readme_test_command_is_the_one_ci_runs() -> None:
    (ci_line,) = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    test_line = _readme_setup_lines()[1]
    assert _pip_requirements(test_line) == _pip_requirements(ci_line)
    assert test_line.rstrip().endswith("-m pytest -q") and ci_line.rstrip().endswith("-m pytest -q")


def test_images_install_extras_that_exist() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for dockerfile in DOCKERFILES:
        installed = [match.group(1).split(",") for kw, args in dockerfile_instructions(dockerfile) if kw == "RUN"
                     for req in _pip_requirements(args) if (match := re.fullmatch(r"\.\[(.+)\]", req))]
        assert installed, f"{dockerfile.name} installs kukla with no extras: nothing to check"
        for names in installed:
            assert set(names) <= set(extras), (dockerfile.name, names)


# ---------------------------------------------------------------- YAML files

YAML_FILES = sorted([*DOCKER.rglob("*.yaml"), *DOCKER.rglob("*.yml")])


def _yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DOCKER)))
def test_yaml_file_parses(path: Path) -> None:
    documents = _yaml_documents(path)
    assert documents, f"{path} is empty"
    for doc in documents:
        if "kind" in doc:  # a Kubernetes object
            assert {"apiVersion", "metadata", "spec"} <= set(doc), path
        else:  # a compose file
            assert "services" in doc, path


def test_compose_stages_wait_for_the_one_before() -> None:
    (compose,) = _yaml_documents(DOCKER / "compose.yaml")
    services = compose["services"]
    order = [name for name in services if name.startswith(("harvest", "finalize", "train", "evaluate"))]
    for before, after in zip(order, order[1:]):
        if after[-1].isdigit() and before.rstrip("0123456789") == after.rstrip("0123456789"):
            continue  # harvest ranks, and finalize workers, run side by side
        needs = services[after].get("depends_on", {})
        assert before in needs and needs[before]["condition"] == "service_completed_successfully", (after, needs)


def test_kubernetes_harvest_is_an_indexed_job_whose_rank_is_the_completion_index() -> None:
    (job,) = _yaml_documents(DOCKER / "k8s" / "harvest.yaml")
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert int(env["WORLD_SIZE"]["value"]) == spec["completions"]


# ---------------------------------------------------------------- command lines


_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::-([^}]*))?\}|\((\w+)\)|(\w+))")
_ASSIGNMENT = re.compile(r"^(?:export\s+)?((?:\w+=\S+\s*)+)$")


def _substitute(word: str, values: dict[str, str]) -> str:
    """Expand shell (`$X`, `${X}`, `${X:-default}`) and Kubernetes (`$(X)`) variables."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3) or match.group(4)
        if name in values:
            return values[name]
        return match.group(2) if match.group(2) is not None else f"<unset ${name}>"

    return _VARIABLE.sub(value, word)


def kukla_arguments(argv: list[str], values: dict[str, str] | None = None) -> list[str] | None:
    """The arguments after `kukla` (also `-m kukla`, as torchrun and python launch it), or None."""
    values = {**BATCH_SYSTEM_VARIABLES, **(values or {})}
    for i, word in enumerate(argv):
        if Path(word).name == "kukla":
            return [_substitute(w, values) for w in argv[i + 1:]]
    return None


def _shell_commands(text: str) -> Iterator[tuple[list[str], dict[str, str]]]:
    """Simple commands of a shell script (continuations joined, split on && ; |), each with the
    variables the script assigned before it."""
    values: dict[str, str] = {}
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assignment = _ASSIGNMENT.match(line)
        if assignment:
            for name, value in (pair.split("=", 1) for pair in assignment.group(1).split()):
                values[name] = _substitute(value, {**BATCH_SYSTEM_VARIABLES, **values})
            continue
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part, comments=True)
            if words:
                yield words, dict(values)


def _container_argvs(doc: Any, image_entrypoint: list[str]) -> Iterator[tuple[list[str], dict[str, str]]]:
    """argv of each container/service in a compose file or Kubernetes object, with the values of
    the container's `env` that Kubernetes substitutes for `$(X)` (a pod's completion index: 0)."""
    if isinstance(doc, dict):
        if "image" in doc and ("command" in doc or "args" in doc or "entrypoint" in doc):
            if "services" not in doc:
                entry = doc.get("entrypoint", doc.get("command") if "args" in doc else None)
                rest = doc.get("args") if "args" in doc else doc.get("command", [])
                entry = image_entrypoint if entry is None else entry
                entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
                rest = shlex.split(rest) if isinstance(rest, str) else list(rest or [])
                env = doc.get("env") if isinstance(doc.get("env"), list) else []
                values = {e["name"]: str(e.get("value", "0")) for e in env if isinstance(e, dict) and "name" in e}
                yield [str(w) for w in entry + rest], values
        for value in doc.values():
            yield from _container_argvs(value, image_entrypoint)
    elif isinstance(doc, list):
        for value in doc:
            yield from _container_argvs(value, image_entrypoint)


def docker_command_lines() -> list[tuple[str, list[str]]]:
    """Every `kukla …` invocation in docker/ and the README, as (where, arguments)."""
    found: list[tuple[str, list[str]]] = []
    for path in sorted(DOCKER.rglob("*")):
        if not path.is_file():
            continue
        where = str(path.relative_to(ROOT))
        if path.name.startswith("Dockerfile"):
            instructions = dockerfile_instructions(path)
            entry = [exec_form(a) for k, a in instructions if k == "ENTRYPOINT"][-1]
            for cmd in [exec_form(a) for k, a in instructions if k == "CMD"]:
                found.append((where, entry[1:] + cmd))
        elif path.suffix in (".yaml", ".yml"):
            for doc in _yaml_documents(path):
                for argv, values in _container_argvs(doc, ["kukla"]):
                    args = kukla_arguments(argv, values)
                    if args is not None:
                        found.append((where, args))
        elif path.suffix in (".sh", ".sbatch"):
            for argv, values in _shell_commands(path.read_text()):
                args = kukla_arguments(argv, values)
                if args is not None and args[:1] != ["--help"]:
                    found.append((where, args))
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for argv, values in _shell_commands(block):
            args = kukla_arguments(argv, values)
            if args is not None:
                found.append(("README.md", args))
    return found


def parse_kukla(args: list[str]) -> Any:
    """Parse `kukla ARGS` with the real CLI, converting every value, without running it.

    Typer ships its own copy of click, so groups are recognised by `resolve_command`.
    """
    command = typer.main.get_command(app)
    ctx = command.make_context("kukla", list(args))
    rest = [*ctx._protected_args, *ctx.args]
    while hasattr(command, "resolve_command"):
        name, command, rest = command.resolve_command(ctx, rest)
        assert command is not None, f"kukla has no command {name!r}"
        ctx = command.make_context(name, rest, parent=ctx)
        rest = [*ctx._protected_args, *ctx.args] if hasattr(command, "resolve_command") else ctx.args
    assert not rest, f"unexpected extra arguments {rest}"
    return command


COMMAND_LINES = docker_command_lines()


def test_every_stage_appears_in_the_batch_job_examples() -> None:
    stages = {args[0] for where, args in COMMAND_LINES if where.startswith("docker/")}
    assert {"harvest", "store", "train", "evaluate", "run", "demo"} <= stages


@pytest.mark.parametrize("where,args", COMMAND_LINES, ids=[f"{w}:{' '.join(a[:2])}" for w, a in COMMAND_LINES])
def test_command_line_passes_the_cli_parser(where: str, args: list[str]) -> None:
    unset = [a for a in args if "<unset $" in a]
    assert not unset, f"{where}: a variable has no value: {unset}"
    try:
        parse_kukla(args)
    except typer.TyperException as exc:  # typer's click: UsageError, BadParameter, NoSuchOption
        pytest.fail(f"{where}: kukla {shlex.join(args)}\n{exc.format_message()}")  # type: ignore[attr-defined]
