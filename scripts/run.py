#!/usr/bin/env python3
"""Bootstrap for a fresh machine with only Python 3.11+: make .venv, install, then run.

python3 scripts/run.py demo "ambient forest at dawn" --duration 5
python3 scripts/run.py test              # ruff, mypy, then pytest (extra args go to pytest)
python3 scripts/run.py <any python -m sona command>
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
REQUIREMENTS = (ROOT / "requirements.txt", ROOT / "requirements-dev.txt")


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036  this file runs under whatever python3 is
        sys.exit(f"Python 3.11 or newer is needed; this is {sys.version.split()[0]}")
    stamp = VENV / ".requirements.sha256"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in REQUIREMENTS)).hexdigest()
    if PYTHON.exists() and stamp.exists() and stamp.read_text() == digest:
        return
    if not PYTHON.exists():
        print("Creating .venv ...", file=sys.stderr, flush=True)
        venv.create(VENV, with_pip=True)
    # Progress goes to stderr: stdout belongs to the command (deploy.sh captures deploy-plan's).
    print("Installing requirements-dev.txt ...", file=sys.stderr, flush=True)
    pip = [str(PYTHON), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "-r", str(ROOT / "requirements-dev.txt")], check=True, stdout=sys.stderr)
    stamp.write_text(digest)


def run(*command: str) -> int:
    return subprocess.run(command, cwd=ROOT, check=False).returncode


def test(pytest_args: list[str]) -> int:
    steps = [
        (str(PYTHON), "-m", "ruff", "check", "."),
        (str(PYTHON), "-m", "mypy"),
    ]
    for step in steps:
        print(f"$ {' '.join(step[2:])}", flush=True)
        if run(*step) != 0:
            return 1
    print("$ pytest", *pytest_args, flush=True)
    return run(str(PYTHON), "-m", "pytest", *pytest_args)


def main(argv: list[str]) -> int:
    ensure_venv()
    if argv[:1] == ["test"]:
        return test(argv[1:])
    return run(str(PYTHON), "-m", "sona", *argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
