"""What each upload holds, read through gcloud's ignore rules (`gcloud topic gcloudignore`: the
syntax of .gitignore, plus `#!include:FILE` lines). `gcloud builds submit` honours .gcloudignore
unless --ignore-file names another file; `gcloud functions deploy --source=.` honours .gcloudignore.
The build needs what its steps run; a function needs only what it imports at run time."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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


def uploaded(ignore_file: str) -> set[str]:
    """The files gcloud would upload from the repository root: it walks the tree and skips what
    the rules match, directories included (a file under an ignored directory is not looked at)."""
    spec, found = rules(ignore_file), set()
    for root, dirs, files in os.walk(REPO):
        here = Path(root).relative_to(REPO)
        dirs[:] = [d for d in dirs if not spec.match_file(f"{(here / d).as_posix()}/")]
        found |= {(here / f).as_posix() for f in files if not spec.match_file((here / f).as_posix())}
    return found


def tracked() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if (REPO / line).exists()}


def build_ignore_file() -> str:
    """The --ignore-file the documented `gcloud builds submit` names (cloudbuild.yaml's header and
    DEPLOYMENT.md must agree)."""
    header = (REPO / "cloudbuild.yaml").read_text().replace("\\\n#", "")
    deployment = (REPO / "DEPLOYMENT.md").read_text().replace("\\\n", "")
    (from_header,) = set(BUILD_SUBMIT.findall(header))
    assert set(BUILD_SUBMIT.findall(deployment)) == {from_header}
    return from_header


def test_the_build_uploads_every_file_the_repository_tracks() -> None:
    missing = tracked() - uploaded(build_ignore_file())
    assert missing == set()


def test_the_build_uploads_what_its_steps_run() -> None:
    files = uploaded(build_ignore_file())
    for step in cloudbuild()["steps"]:
        for arg in [step.get("entrypoint", ""), *step.get("args", [])]:
            for path in re.findall(r"[\w./-]+\.(?:py|sh|txt)\b", str(arg)):
                if not path.startswith(("/", ".venv/")):
                    assert path in files, (step["id"], path)
    assert FUNCTION_IGNORE in files  # the deploy step's function uploads still follow it


def test_the_build_leaves_local_state_and_secrets_behind(tmp_path: Path) -> None:
    spec = rules(build_ignore_file())
    for path in (".env", ".venv/", ".git/", ".sona/", "sona/__pycache__/", "bench-results-1.json"):
        assert spec.match_file(path), path


def test_the_default_ignore_file_would_starve_the_build() -> None:
    """Why the build names its own file: the function's rules drop what the test step runs."""
    files = uploaded(FUNCTION_IGNORE)
    assert "scripts/run.py" not in files and "requirements-dev.txt" not in files


def test_a_function_uploads_its_code_and_lock_and_nothing_else() -> None:
    files = uploaded(FUNCTION_IGNORE)
    runtime = {p for p in tracked() if p.startswith("sona/")}  # the whole package deploys
    assert {"main.py", "requirements.txt"} | runtime <= files
    assert not [p for p in files if p.startswith(("tests/", "scripts/", "devstack/", "supabase/"))]
    assert ".env" not in files and "requirements-dev.txt" not in files


def test_the_function_upload_alone_imports_every_module_the_function_runs(tmp_path: Path) -> None:
    for path in uploaded(FUNCTION_IGNORE):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / path, tmp_path / path)
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
