"""A virtual environment kept in step with its requirements files. Standard library only: the
bootstrap (scripts/run.py) uses it on a machine that has nothing but Python."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from collections.abc import Sequence
from pathlib import Path

# The pip that installs each lock, pinned and hashed. A new environment starts with the pip its Python
# bundles (23.2.1 with Python 3.11.7), which refuses a hashed lock once a package asks for an extra of a
# dependency that has a release newer than the pin ("all requirements must have their versions pinned
# with =="): pip-audit's CacheControl[filecache] did, the day cachecontrol 0.15.0 came out (2026-12-07),
# and every fresh clone's .venv failed. pip 26.3 (the dev lock's own pin) resolves it to the pinned 0.14.4.
PIP_REQUIREMENT = Path(__file__).with_name("pip-requirement.txt")


def ensure_venv(directory: Path, install: Path, inputs: Sequence[Path], *, clear: bool = False) -> Path:
    """Make (or, with clear, remake) the environment and `pip install -r install` whenever the
    inputs (or the pinned pip) changed since the last time; return its python. Progress goes to
    stderr, because stdout belongs to the command that follows (deploy.sh captures deploy-plan's)."""
    python = directory / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    stamp = directory / ".requirements.sha256"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in (PIP_REQUIREMENT, *inputs))).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    if clear or not python.exists():
        print(f"Creating {directory.name} ...", file=sys.stderr, flush=True)
        venv.create(directory, with_pip=True, clear=clear)
    print(f"Installing {install.name} into {directory.name} ...", file=sys.stderr, flush=True)
    pip_install = (str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install", "-r")
    for requirements in (PIP_REQUIREMENT, install):  # two runs: the new pip must resolve the lock
        subprocess.run([*pip_install, str(requirements)], check=True, stdout=sys.stderr)
    stamp.write_text(digest)
    return python


# The oldest Python the function supports (pyproject.toml's requires-python). uv's universal
# resolution starts there and covers every newer one, with environment markers where they differ.
OLDEST_PYTHON = "3.11"
# Each lock and its input, the runtime one first: requirements-dev.in is constrained by it.
LOCKS = (("requirements.in", "requirements.txt"), ("requirements-dev.in", "requirements-dev.txt"))
# Hashed, because pip then installs in hash-checking mode: Cloud Functions' build refuses any
# package or file that is not in the lock, instead of quietly resolving one.
UV_COMPILE = ("pip", "compile", "--universal", "--python-version", OLDEST_PYTHON, "--generate-hashes")


def lock_commands(python: str, extra: Sequence[str] = ()) -> list[list[str]]:
    """The commands that regenerate both locks with uv, which the dev lock pins (nothing at run time
    needs it). extra goes to each, e.g. --upgrade or --upgrade-package NAME."""
    header = ("--custom-compile-command", "python3 scripts/run.py lock", "--quiet")
    return [
        [python, "-m", "uv", *UV_COMPILE, source, "--output-file", output, *header, *extra]
        for source, output in LOCKS
    ]
