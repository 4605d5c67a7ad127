"""What each upload holds, read through gcloud's ignore rules (`gcloud topic gcloudignore`: the
syntax of .gitignore, plus `#!include:FILE` lines). `gcloud builds submit` honours .gcloudignore
unless --ignore-file names another file, and never uploads .git/; `gcloud functions deploy
--source=.` honours .gcloudignore. Both files are allow-lists: the build needs what its steps run, a
function only what it imports at run time, and nothing else an operator leaves at the root travels.
These tests run in the build's own upload too (no .git/ there): they never need git."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pathspec import GitIgnoreSpec

from tests.test_deploy import REPO, cloudbuild

FUNCTION_IGNORE = ".gcloudignore"
BUILD_SUBMIT = re.compile(r"gcloud builds submit .*?--ignore-file=(\S+)")


def rules(name: str) -> GitIgnoreSpec:
    lines: list[str] = []
    for line in (REPO / name).read_text().splitlines():
        include = re.fullmatch(r"#!include:(.+)", line.strip())
        lines += (REPO / include.group(1)).read_text().splitlines() if include else [line]
    return GitIgnoreSpec.from_lines(lines)


def uploaded(ignore_file: str, root: Path = REPO) -> set[str]:
    """The files gcloud would upload from root: it walks the tree and skips what the rules match,
    directories included (a file under an ignored directory is not looked at), and .git/ always."""
    spec, found = rules(ignore_file), set()
    for top, dirs, files in os.walk(root):
        here = Path(top).relative_to(root)
        dirs[:] = [d for d in dirs if d != ".git" and not spec.match_file(f"{(here / d).as_posix()}/")]
        found |= {(here / f).as_posix() for f in files if not spec.match_file((here / f).as_posix())}
    return found


# Local state and caches: never part of the project, whatever an ignore file says.
LOCAL = (".git/", ".venv/", ".sona/", ".mypy_cache/", ".ruff_cache/", ".pytest_cache/")


def project_files() -> set[str]:
    """The project's files as this checkout holds them, without asking git (the build's upload has
    no .git/): everything but local state, caches and bytecode."""
    found = set()
    for top, dirs, files in os.walk(REPO):
        here = Path(top).relative_to(REPO)
        dirs[:] = [d for d in dirs if f"{(here / d).as_posix()}/" not in LOCAL and d != "__pycache__"]
        found |= {(here / f).as_posix() for f in files if not f.endswith(".pyc") and f != ".git"}
    return {f.removeprefix("./") for f in found}


def copy_upload(ignore_file: str, target: Path) -> Path:
    for path in uploaded(ignore_file):
        (target / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, target / path)  # the upload's tar keeps each file's mode
    return target


def build_ignore_file() -> str:
    """The --ignore-file the documented `gcloud builds submit` names (cloudbuild.yaml's header and
    DEPLOYMENT.md must agree)."""
    header = (REPO / "cloudbuild.yaml").read_text().replace("\\\n#", "")
    deployment = (REPO / "DEPLOYMENT.md").read_text().replace("\\\n", "")
    (from_header,) = set(BUILD_SUBMIT.findall(header))
    assert set(BUILD_SUBMIT.findall(deployment)) == {from_header}
    return from_header


# What the repository holds that no build step reads: git's and CI's own files, and this list.
BUILD_LEAVES = {".gitignore", ".ci/run"}
# What an operator may leave at the root (DEPLOYMENT.md once had the first three made there).
OPERATOR_FILES = ["webhook-secret.txt", "webhook.sql", "prod.dump", ".env", "service-account.json", "notes/x"]


def test_the_build_uploads_every_project_file_its_steps_may_read() -> None:
    stray = {
        f for f in project_files() if f.split("/")[0] in {"deploy.env", *OPERATOR_FILES, "bench-results"}
    }
    missing = project_files() - uploaded(build_ignore_file()) - BUILD_LEAVES - stray
    assert {m for m in missing if not m.startswith("bench-results")} == set()


@pytest.mark.parametrize("ignore_file", [FUNCTION_IGNORE, ".gcloudignore-build"])
@pytest.mark.parametrize("name", OPERATOR_FILES)
def test_a_file_an_operator_leaves_at_the_root_never_travels(ignore_file: str, name: str) -> None:
    assert rules(ignore_file).match_file(name), f"{name} would travel in the {ignore_file} upload"


def test_the_deploy_settings_travel_with_the_build() -> None:
    """deploy.env is the one settings file both paths read: the build's plan step needs it."""
    spec = rules(build_ignore_file())
    assert not spec.match_file("deploy.env")
    assert rules(FUNCTION_IGNORE).match_file("deploy.env")  # a function reads its env vars, not it


def test_the_build_test_step_passes_in_what_the_build_uploads(tmp_path: Path) -> None:
    """The build's test step runs in the upload, which has no .git/: this file's tests pass there."""
    copy = copy_upload(build_ignore_file(), tmp_path / "workspace")
    assert not (copy / ".git").exists()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "tests/test_gcloudignore.py",
            "-k",
            "not in_what_the_build_uploads and not imports_every_module",
        ],
        cwd=copy,
        env={**os.environ, "PYTHONPATH": str(copy)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_the_build_uploads_what_its_steps_run() -> None:
    files = uploaded(build_ignore_file())
    for step in cloudbuild()["steps"]:
        for arg in [step.get("entrypoint", ""), *step.get("args", [])]:
            for path in re.findall(r"[\w./-]+\.(?:py|sh|txt)\b", str(arg)):
                if not path.startswith(("/", ".venv/")):
                    assert path in files, (step["id"], path)
    assert FUNCTION_IGNORE in files  # the deploy step's function uploads still follow it


def test_the_build_leaves_local_state_and_secrets_behind() -> None:
    spec = rules(build_ignore_file())
    for path in (".env", ".venv/", ".sona/", "sona/__pycache__/", "bench-results-1.json"):
        assert spec.match_file(path), path


def test_the_default_ignore_file_would_starve_the_build() -> None:
    """Why the build names its own file: the function's rules drop what the test step runs."""
    files = uploaded(FUNCTION_IGNORE)
    assert "scripts/run.py" not in files and "requirements-dev.txt" not in files


def test_a_function_uploads_its_code_and_lock_and_nothing_else() -> None:
    files = uploaded(FUNCTION_IGNORE)
    runtime = {p for p in project_files() if p.startswith("sona/")}  # the whole package deploys
    assert {"main.py", "requirements.txt"} | runtime <= files
    assert not [p for p in files if p.startswith(("tests/", "scripts/", "devstack/", "supabase/"))]
    assert ".env" not in files and "requirements-dev.txt" not in files


def test_the_function_upload_alone_imports_every_module_the_function_runs(tmp_path: Path) -> None:
    copy_upload(FUNCTION_IGNORE, tmp_path)
    runtime = sorted(
        p.removesuffix(".py").replace("/", ".")
        for p in uploaded(FUNCTION_IGNORE)
        if p.startswith("sona/") and p.endswith(".py") and p != "sona/__main__.py"
    )
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, '.'); {code}", "main", *runtime],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_cloudbuild_yaml_is_what_the_build_reads() -> None:
    assert yaml.safe_load((REPO / "cloudbuild.yaml").read_text())["steps"]
