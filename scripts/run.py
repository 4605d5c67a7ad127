#!/usr/bin/env python3
"""Bootstrap for a fresh machine with only Python 3.11+: make .venv, install, then run.

python3 scripts/run.py demo "ambient forest at dawn" --duration 5
python3 scripts/run.py test              # ruff, squawk, then mypy beside the whole suite on 4 xdist workers
python3 scripts/run.py test tests/test_x.py -k name   # ruff, mypy, then only those tests, one process
python3 scripts/run.py lock [--upgrade]  # regenerate requirements.txt and requirements-dev.txt
python3 scripts/run.py <any python -m sona or python -m devstack command>
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = (ROOT / "requirements.txt", ROOT / "requirements-dev.txt")
# On two cores the whole suite is bound by CPU (process accounting, issue 34), but some groups mostly
# wait (the hardening cases' deadlines, the relay's pauses): four workers keep both cores busy while
# they do. tests/conftest.py groups the tests so that parallel runs stay safe.
WORKERS = "4"
# The local world's commands live in devstack (sona never imports it, and it never deploys).
LOCAL_COMMANDS = ("demo", "dev", "bench")

if sys.version_info < (3, 11):  # noqa: UP036  this file runs under whatever python3 is
    sys.exit(f"Python 3.11 or newer is needed; this is {sys.version.split()[0]}")
sys.path.insert(0, str(ROOT))
from devstack.venvs import ensure_venv, lock_commands  # noqa: E402  (standard library only)


def run(*command: str) -> int:
    return subprocess.run(command, cwd=ROOT, check=False).returncode


def test(python: str, pytest_args: list[str]) -> int:
    """ruff, squawk, mypy and pytest; fails if any fails. The whole suite (no arguments) runs on
    WORKERS workers with mypy beside it (about 13 s on a fresh clone), its report printed after the
    tests'. With arguments it is the quick loop: mypy first, then those tests in one process."""
    print("$ ruff check .", flush=True)
    if run(python, "-m", "ruff", "check", ".") != 0:
        return 1
    # The migration linter (rules off, and why: .squawk.toml); its binary comes with the wheel.
    migrations = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "supabase" / "migrations").glob("*.sql"))
    print("$ squawk", *migrations, flush=True)
    if run(str(Path(python).parent / "squawk"), *migrations) != 0:
        return 1
    mypy = (python, "-m", "mypy")
    if pytest_args:
        print("$ mypy", flush=True)
        if run(*mypy) != 0:
            return 1
        print("$ pytest", *pytest_args, flush=True)
        return run(python, "-m", "pytest", *pytest_args)
    print("$ mypy (beside pytest; its report follows the tests)", flush=True)
    with tempfile.TemporaryFile() as report:
        checking = subprocess.Popen(mypy, cwd=ROOT, stdout=report, stderr=subprocess.STDOUT)
        # mypy takes what the tests leave: on two cores its ~13 CPU-s would otherwise come out of
        # pytest's wall time, and the suite idles long enough for it to finish beside the tests.
        if hasattr(os, "setpriority"):
            os.setpriority(os.PRIO_PROCESS, checking.pid, 10)
        print("$ pytest -n", WORKERS, flush=True)
        tested = run(python, "-m", "pytest", "-n", WORKERS)
        typed = checking.wait()
        report.seek(0)
        print("$ mypy", report.read().decode(errors="replace"), sep="\n", end="", flush=True)
    return 1 if tested or typed else 0


def lock(python: str, uv_args: list[str]) -> int:
    for command in lock_commands(python, uv_args):
        if run(*command) != 0:
            return 1
    return 0


def main(argv: list[str]) -> int:
    python = str(ensure_venv(ROOT / ".venv", ROOT / "requirements-dev.txt", REQUIREMENTS))
    if argv[:1] == ["test"]:
        return test(python, argv[1:])
    if argv[:1] == ["lock"]:
        return lock(python, argv[1:])
    package = "devstack" if argv[:1] and argv[0] in LOCAL_COMMANDS else "sona"
    return run(python, "-m", package, *argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
