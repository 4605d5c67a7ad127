"""The deployed function installs exactly what was tested: requirements.txt pins, with hashes, every
package that `pip install -r requirements.txt` brings on each Python the function supports, and it is
in step with requirements.in and with the dev lock the tests run from. Offline: the locks are read as
text and the dependency tree is walked through the installed packages' own metadata."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

from devstack import venvs
from devstack.venvs import LOCKS, OLDEST_PYTHON, PIP_REQUIREMENT, ensure_venv
from sona.ops.deploy import RUNTIME

REPO = Path(__file__).resolve().parents[1]
SUPPORTED_PYTHONS = ("3.11", "3.12", "3.13")
RUNTIME_LOCK, DEV_LOCK = (output for _, output in LOCKS)
INPUT = dict((output, source) for source, output in LOCKS)

Environment = dict[str, str]


def linux(python: str) -> Environment:
    """Cloud Functions' platform (CPython on Linux x86_64) with the given Python."""
    return {
        **default_environment(),
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "implementation_version": f"{python}.0",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
    }


ENVIRONMENTS = {f"linux-py{v}": linux(v) for v in SUPPORTED_PYTHONS} | {"this-python": default_environment()}


def applies(marker: Marker | None, env: Environment, extras: frozenset[str] = frozenset()) -> bool:
    return marker is None or any(marker.evaluate({**env, "extra": e}) for e in {"", *extras})


@dataclass(frozen=True)
class Pin:
    requirement: Requirement
    hashes: tuple[str, ...]

    @property
    def name(self) -> NormalizedName:
        return canonicalize_name(self.requirement.name)

    @property
    def version(self) -> str | None:
        """The exact version, or None unless the specifier is a single `==` of a whole version."""
        (spec, *more) = [*self.requirement.specifier] or [None]
        if spec is None or more or spec.operator != "==" or spec.version.endswith("*"):
            return None
        return spec.version


@dataclass(frozen=True)
class Lock:
    pins: tuple[Pin, ...]
    other_lines: tuple[str, ...]  # options, URLs, editables: nothing a lock should hold

    def pinned(self, env: Environment) -> dict[NormalizedName, list[Pin]]:
        found: dict[NormalizedName, list[Pin]] = {}
        for pin in self.pins:
            if applies(pin.requirement.marker, env):
                found.setdefault(pin.name, []).append(pin)
        return found

    def pin(self, name: str, env: Environment) -> Pin | None:
        return next(iter(self.pinned(env).get(canonicalize_name(name), [])), None)


def logical_lines(path: Path) -> Iterator[str]:
    """The file's lines with continuations joined and comments dropped, as pip reads them."""
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if line:
            yield line


@cache
def read_lock(name: str) -> Lock:
    pins, other = [], []
    for line in logical_lines(REPO / name):
        requirement, _, options = line.partition(" --")
        hashes = re.findall(r"--hash=(sha256:[0-9a-f]{64})", f"--{options}")
        if line.startswith("-") or "://" in line or "@" in requirement:
            other.append(line)
        else:
            pins.append(Pin(Requirement(requirement), tuple(hashes)))
    return Lock(tuple(pins), tuple(other))


@cache
def top_level(name: str) -> tuple[Requirement, ...]:
    """The requirements of an input file, following its -r includes (its -c constraints are not
    requirements)."""
    found: list[Requirement] = []
    for line in logical_lines(REPO / name):
        option, _, argument = line.partition(" ")
        if option in ("-r", "--requirement"):
            found.extend(top_level(argument.strip()))
        elif option not in ("-c", "--constraint"):
            found.append(Requirement(line))
    return tuple(found)


@dataclass(frozen=True)
class Walk:
    reached: dict[NormalizedName, str]  # package -> what needs it
    problems: list[str]


def walk(lock_name: str, env: Environment) -> Walk:
    """What pip would install from the lock in env: its input's top-level requirements and, through
    the installed packages' metadata, theirs. A package installed here at another version than the
    lock's, or not at all (audioop-lts below 3.13), is a leaf: its own requirements can't be read
    offline, and pip's hash-checking mode refuses at install time any that the lock lacks."""
    pinned = read_lock(lock_name).pinned(env)
    queue = [(r, INPUT[lock_name]) for r in top_level(INPUT[lock_name])]
    reached: dict[NormalizedName, str] = {}
    extras: dict[NormalizedName, frozenset[str]] = {}
    problems: list[str] = []
    while queue:
        requirement, via = queue.pop()
        name = canonicalize_name(requirement.name)
        wanted = extras.get(name, frozenset()) | requirement.extras
        if not applies(requirement.marker, env, extras.get(canonicalize_name(via), frozenset())):
            continue
        if name in reached and wanted == extras[name]:
            continue  # seen, and no new extra asks for more of its requirements
        reached.setdefault(name, via)
        extras[name] = frozenset(wanted)
        pin = next(iter(pinned.get(name, [])), None)
        if pin is None or pin.version is None:
            problems.append(f"{name} (needed by {via}) is not pinned with ==")
            continue
        if not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{name}=={pin.version} does not satisfy {via}'s {requirement}")
        package = installed().get(name)
        if package is None or package.version != pin.version:
            continue
        queue.extend((Requirement(dependency), name) for dependency in package.requires)
    return Walk(reached, problems)


@dataclass(frozen=True)
class Installed:
    version: str
    requires: tuple[str, ...]


@cache
def installed() -> dict[NormalizedName, Installed]:
    """This environment's packages (read once: each metadata read parses the file again); the first
    one found on sys.path wins, as on import."""
    found: dict[NormalizedName, Installed] = {}
    for distribution in metadata.distributions():
        name = canonicalize_name(distribution.metadata["Name"])
        if name not in found:
            found[name] = Installed(distribution.version, tuple(distribution.requires or ()))
    return found


def installed_version(name: NormalizedName) -> str | None:
    package = installed().get(name)
    return package.version if package else None


LOCK_NAMES = [RUNTIME_LOCK, DEV_LOCK]
LOCKS_IN_ENVIRONMENTS = [
    pytest.param(lock, env, id=f"{lock}-{env_id}")
    for lock in LOCK_NAMES
    for env_id, env in ENVIRONMENTS.items()
]


# -- the lock itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("lock_name", LOCK_NAMES)
def test_every_pin_is_exact_and_hashed(lock_name: str) -> None:
    """pip installs in hash-checking mode: only these versions, only these files."""
    lock = read_lock(lock_name)
    assert lock.pins
    assert [p.requirement for p in lock.pins if p.version is None] == []
    assert [p.name for p in lock.pins if not p.hashes] == []
    assert lock.other_lines == ()


@pytest.mark.parametrize(("lock_name", "env"), LOCKS_IN_ENVIRONMENTS)
def test_no_package_is_pinned_twice_for_one_python(lock_name: str, env: Environment) -> None:
    twice = {name: pins for name, pins in read_lock(lock_name).pinned(env).items() if len(pins) > 1}
    assert twice == {}


@pytest.mark.parametrize(("lock_name", "env"), LOCKS_IN_ENVIRONMENTS)
def test_everything_pip_installs_from_the_lock_is_pinned_in_it(lock_name: str, env: Environment) -> None:
    assert walk(lock_name, env).problems == []


@pytest.mark.parametrize(("lock_name", "env"), LOCKS_IN_ENVIRONMENTS)
def test_the_lock_pins_each_top_level_requirement_within_its_range(lock_name: str, env: Environment) -> None:
    lock = read_lock(lock_name)
    out_of_step = [
        str(r)
        for r in top_level(INPUT[lock_name])
        if applies(r.marker, env)
        and (
            (pin := lock.pin(r.name, env)) is None
            or pin.version is None
            or not r.specifier.contains(pin.version, prereleases=True)
        )
    ]
    assert out_of_step == []


def test_the_runtime_lock_holds_only_what_the_function_needs() -> None:
    """No dev tool (uv, pip-audit, pytest ...) and no stale pin is deployed."""
    needed = set().union(*(walk(RUNTIME_LOCK, env).reached for env in ENVIRONMENTS.values()))
    assert sorted({p.name for p in read_lock(RUNTIME_LOCK).pins} - needed) == []


def test_only_python_3_13_and_newer_get_audioop_lts() -> None:
    """pydub needs the audioop module, which Python 3.13 removed."""
    lock = read_lock(RUNTIME_LOCK)
    assert {v: lock.pin("audioop-lts", linux(v)) is not None for v in SUPPORTED_PYTHONS} == {
        "3.11": False,
        "3.12": False,
        "3.13": True,
    }


def test_the_dev_lock_keeps_the_versions_that_deploy() -> None:
    dev = {(p.name, str(p.requirement.marker)): p.version for p in read_lock(DEV_LOCK).pins}
    runtime = {(p.name, str(p.requirement.marker)): p.version for p in read_lock(RUNTIME_LOCK).pins}
    assert {key: (version, dev.get(key)) for key, version in runtime.items() if dev.get(key) != version} == {}


def test_the_tests_run_on_exactly_the_dev_lock() -> None:
    """This environment is installed from requirements-dev.txt (scripts/run.py reinstalls it when a
    lock changes), so what the suite tested is what the locks say."""
    env = default_environment()
    pinned = {name: pins[0].version for name, pins in read_lock(DEV_LOCK).pinned(env).items()}
    drift = {
        name: (installed_version(name), pinned.get(name))
        for name in walk(DEV_LOCK, env).reached
        if installed_version(name) != pinned.get(name)
    }
    assert drift == {}


# -- how the locks are made and used ------------------------------------------------------------


def test_the_pip_that_installs_the_locks_is_the_dev_locks_own_pin_and_hashes() -> None:
    """Installed first, so the dev lock then finds it in place (no downgrade, then upgrade)."""
    (bootstrap,) = read_lock(str(PIP_REQUIREMENT.relative_to(REPO))).pins
    (locked,) = [p for p in read_lock(DEV_LOCK).pins if p.name == "pip"]
    assert (bootstrap.requirement.specifier, bootstrap.hashes) == (
        locked.requirement.specifier,
        locked.hashes,
    )
    assert bootstrap.version is not None and bootstrap.hashes


@pytest.fixture
def installs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What ensure_venv asks pip to install, in order, with nothing made or installed."""
    installed: list[str] = []

    def make(directory: Path, **_: object) -> None:
        (directory / "bin").mkdir(parents=True)
        (directory / "bin" / "python").touch()

    def run(command: list[str], **_: object) -> None:
        installed.append(Path(command[-1]).name)

    monkeypatch.setattr(venvs.venv, "create", make)
    monkeypatch.setattr(venvs.subprocess, "run", run)
    return installed


@pytest.fixture
def empty_lock(tmp_path: Path) -> Path:
    lock = tmp_path / "lock.txt"
    lock.write_text("# nothing\n")
    return lock


def test_a_new_environment_gets_the_pinned_pip_before_its_lock(installs: list[str], empty_lock: Path) -> None:
    ensure_venv(empty_lock.parent / "venv", empty_lock, [empty_lock])
    assert installs == [PIP_REQUIREMENT.name, "lock.txt"]


def test_an_environment_is_reinstalled_when_the_pinned_pip_changes(
    installs: list[str], empty_lock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv_dir = empty_lock.parent / "venv"
    ensure_venv(venv_dir, empty_lock, [empty_lock])
    ensure_venv(venv_dir, empty_lock, [empty_lock])
    assert len(installs) == 2  # the second call found everything as the stamp says
    newer_pip = empty_lock.parent / "pip-requirement.txt"
    newer_pip.write_text(PIP_REQUIREMENT.read_text().replace("pip==", "pip==99.", 1))
    monkeypatch.setattr(venvs, "PIP_REQUIREMENT", newer_pip)
    ensure_venv(venv_dir, empty_lock, [empty_lock])
    assert installs[2:] == [newer_pip.name, "lock.txt"]


def test_the_locks_are_resolved_from_the_oldest_supported_python() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"] == f">={OLDEST_PYTHON}"
    assert pyproject["tool"]["mypy"]["python_version"] == OLDEST_PYTHON
    assert SUPPORTED_PYTHONS[0] == OLDEST_PYTHON


def test_the_deployed_runtime_is_a_locked_python() -> None:
    version = re.fullmatch(r"python3(\d+)", RUNTIME)
    assert version is not None
    assert f"3.{version[1]}" in SUPPORTED_PYTHONS


def test_the_buildpack_finds_functions_framework_in_the_lock() -> None:
    """Google's Python buildpack adds its own, unpinned functions-framework unless requirements.txt
    has a line matching this (GoogleCloudPlatform/buildpacks, pkg/python/dependencies.go)."""
    assert re.search(r"(?m)^functions-framework\b([^-]|$)", (REPO / RUNTIME_LOCK).read_text())
