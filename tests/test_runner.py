"""scripts/run.py, the README's two commands: what it hands the test run."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

RUNNER = Path(__file__).resolve().parents[1] / "scripts" / "run.py"


def runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sona_runner", RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_suite_writes_bytecode_even_where_the_environment_turns_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Otherwise each of the suite's Python processes compiles the tree from source again."""
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("SONA_RUNNER_PROBE", "kept")
    env = runner().with_bytecode()
    assert "PYTHONDONTWRITEBYTECODE" not in env
    assert env["SONA_RUNNER_PROBE"] == "kept"
