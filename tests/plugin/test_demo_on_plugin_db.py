"""`demo --database-url` on a copy of the plug-in's database: the job is charged as generate charges
it, and the balance the billing page reads is shown before and after."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devstack.plugin_generate import GenerateRequest

pytestmark = pytest.mark.slow


def test_the_demo_charges_as_generate_does_where_the_token_tables_exist(
    plugin_empty_db_url: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "devstack",
            "demo",
            "ambient forest at dawn",
            "--duration",
            "5",
            "--database-url",
            plugin_empty_db_url,
        ],
        cwd=Path(__file__).resolve().parents[2],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    request = GenerateRequest("ambient forest at dawn", 5, "medium", "designer")
    welcome = 500  # the plug-in's trigger on auth.users
    charged = f"{request.cost()} charged: {request.description()}"
    assert f"Tokens: {welcome} before, {welcome - request.cost()} after ({charged})" in result.stdout
    assert "Mode:        designer" in result.stdout
