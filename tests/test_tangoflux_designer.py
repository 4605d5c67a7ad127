"""The designer mode served the way the plug-in was built to serve it: TangoFlux on Replicate
(DESIGNER_MODEL=tangoflux; docs/plugin-client.md, the plug-in's audio-worker/src/audio-clients/factory.ts),
its double standing in for Replicate, through real processes; and `demo --mode designer` with it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import LocalStack
from tests.support import RELAY_PAUSE_S

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_server: str) -> Iterator[LocalStack]:
    env = {"DESIGNER_MODEL": "tangoflux", "GENERATION_POLL_MS": "200"}
    with LocalStack(
        tmp_path_factory.mktemp("tangoflux"),
        env=env,
        database_server=pg_server,
        relay_pause_s=RELAY_PAUSE_S,
        reclaim_function=False,
    ) as running:
        yield running


@pytest.mark.parametrize(("quality", "steps"), [("low", 25), ("medium", 100), ("high", 200)])
def test_a_designer_job_from_generate_is_made_by_tangoflux_once(
    stack: LocalStack, quality: str, steps: int
) -> None:
    assert stack.replicate is not None
    job_id = stack.insert_as_generate(f"glass shattering {quality}", 3, quality, "designer")
    row = stack.wait_for(job_id, timeout_s=60)
    assert row["status"] == "completed", row["error_message"]
    assert (row["audio"]["model"], row["enhanced_prompt"]) == (
        "tangoflux",
        f"glass shattering {quality}. very short",
    )
    made = [r for r in stack.replicate.made if r.input["prompt"] == row["enhanced_prompt"]]
    assert [(r.id, r.input["steps"], r.input["duration"]) for r in made] == [(row["generation_id"], steps, 3)]
    assert row["preview_path"] and row["filename"].endswith("_TangoFlux")


def test_the_other_modes_stay_on_stable_audio(stack: LocalStack) -> None:
    job_id = stack.insert_as_generate("warm pad in a minor", 4, "medium", "creator")
    row = stack.wait_for(job_id, timeout_s=60)
    assert (row["status"], row["audio"]["model"]) == ("completed", "stable-audio-2.5")


def test_demo_runs_a_designer_job_on_tangoflux(tmp_path: Path) -> None:
    demo = [sys.executable, "-m", "devstack", "demo"]
    result = subprocess.run(
        [*demo, "metal door slam", "--mode", "designer", "--duration", "4", "--json"],
        cwd=Path(__file__).resolve().parents[1],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DESIGNER_MODEL": "tangoflux"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    shown = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert (shown["status"], shown["audio"]["model"]) == ("completed", "tangoflux")
