"""requirements.txt installs the way Google's Python buildpack installs it when it builds the
function (GoogleCloudPlatform/buildpacks, pkg/python/python.go, InstallRequirements):

    python3 -m pip install --requirement requirements.txt --upgrade --upgrade-strategy only-if-needed
        --no-warn-script-location --no-warn-conflicts --force-reinstall --no-compile [--user]

then `pip check`. With hashes in the file pip runs in hash-checking mode, so every package the
install brings must be pinned and hashed, and here it must come from a wheel. The buildpack installs
into a fresh image with --user; a clean virtual environment is the same clean slate here.

The wheels are fetched once per lock into a wheelhouse in the temp dir (pip download, hashes
checked) and the install itself reads only that folder (--no-index), so the test runs offline after
its first run on the machine, in any checkout."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import pytest

from tests.test_gcloudignore import FUNCTION_IGNORE, uploaded

pytestmark = pytest.mark.slow  # real processes (tests/conftest.py starts such files first)
REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.txt"
WHEELHOUSES = Path(tempfile.gettempdir())  # one folder per lock, shared by every checkout
BUILDPACK_PIP_INSTALL = (
    "--upgrade",
    "--upgrade-strategy",
    "only-if-needed",
    "--no-warn-script-location",
    "--no-warn-conflicts",
    "--force-reinstall",
    "--no-compile",
)


def wheelhouse() -> Path:
    """Every wheel the lock names for this platform, downloaded once per lock (its digest names the
    folder) and shared by the machine's checkouts, as pip's own cache is: each fresh clone's suite
    downloaded them again into its own .sona/. Made in a folder of its own and renamed into place,
    so a suite running beside another never reads half of one."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    house = WHEELHOUSES / f"sona-wheelhouse-{digest}"
    if house.is_dir():
        return house
    building = house.with_name(f"{house.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "download", "--requirement", str(LOCK), "--only-binary=:all:", "--dest", str(building)],
        check=True,
        capture_output=True,
    )
    try:
        building.rename(house)
    except OSError:  # another suite's download got there first: the same wheels
        shutil.rmtree(building, ignore_errors=True)
    return house


def pip_for(python: Path) -> list[str]:
    """pip run against the clean environment's interpreter (pip's --python): the environment gets
    no pip or setuptools of its own, whose install (ensurepip) cost more than the lock's."""
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python)]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A clean environment with requirements.txt installed as the buildpack installs it."""
    env_dir = tmp_path_factory.mktemp("buildpack") / "venv"
    venv.create(env_dir)
    python = env_dir / "bin" / "python"
    result = subprocess.run(
        [
            *pip_for(python),
            "install",
            "--requirement",
            str(LOCK),
            *BUILDPACK_PIP_INSTALL,
            "--only-binary=:all:",
            "--no-index",
            "--find-links",
            str(wheelhouse()),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return python, result


def test_the_lock_installs_with_hashes_from_wheels_alone(
    built: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    python, result = built
    assert result.returncode == 0, result.stderr[-3000:]
    check = subprocess.run([*pip_for(python), "check"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout


def test_the_installed_lock_runs_the_function_upload(
    built: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    python, result = built
    assert result.returncode == 0, result.stderr[-3000:]
    for path in uploaded(FUNCTION_IGNORE):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / path, tmp_path / path)
    probe = (
        "import main, sona.job.pipeline, sona.reclaim, subprocess; "
        "from sona.audio.ffmpeg import find_ffmpeg; "
        "print(subprocess.run([find_ffmpeg(), '-version'], capture_output=True, text=True).stdout)"
    )
    no_tools = tmp_path / "empty-path"
    no_tools.mkdir()
    ran = subprocess.run(
        [str(python), "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": str(no_tools)},
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("ffmpeg version")  # the wheel's own binary: no ffmpeg on this PATH
