"""scripts/deploy.sh run for real against a `gcloud` on PATH that answers like the real one where a
first deploy meets trouble (tests/fake_gcloud.py: a new metric type's 404, the dashboard's etag, the
domain-restricted-sharing refusal, the build service account). The plan must complete, and a second
run must change nothing but update in place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import fake_gcloud
from tests.test_deploy import REPO, cloudbuild_env


def install_fakes(bin_dir: Path) -> None:
    bin_dir.mkdir()
    for name, args in (("gcloud", ""), ("sleep", "--sleep ")):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{fake_gcloud.__file__}" {args}"$@"\n')
        script.chmod(0o755)


class Project:
    """One fake Google Cloud project and the deploy script run against it."""

    def __init__(self, tmp_path: Path, **scenario: bool) -> None:
        self.state_file = tmp_path / "gcloud-state.json"
        self.state_file.write_text(json.dumps(fake_gcloud.new_state(**scenario)))
        self.bin = tmp_path / "bin"
        install_fakes(self.bin)

    @property
    def state(self) -> dict[str, Any]:
        return dict(json.loads(self.state_file.read_text()))

    def deploy(self, overrides: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", "/tmp"),
            "PYTHON": sys.executable,
            "PYTHONPATH": str(REPO),
            "FAKE_GCLOUD_STATE": str(self.state_file),
            **cloudbuild_env(overrides),
        }
        return subprocess.run(
            [str(REPO / "scripts" / "deploy.sh")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    def calls(self, *words: str) -> list[list[str]]:
        return [c for c in self.state["calls"] if c[: len(words)] == list(words)]


def resources(state: dict[str, Any]) -> dict[str, list[str]]:
    kinds = ("functions", "queues", "scheduler", "metrics", "dashboards", "policies")
    return {kind: sorted(state[kind]) for kind in kinds}


@pytest.fixture
def org_project(tmp_path: Path) -> Project:
    """A project made after July 2024, in an organisation that enforces domain restricted sharing."""
    return Project(tmp_path, drs=True, new_project=True)


def test_a_first_deploy_completes_in_a_new_org_project(org_project: Project) -> None:
    result = org_project.deploy()
    assert result.returncode == 0, result.stderr
    state = org_project.state
    assert set(state["functions"]) == {"process-job", "run-job", "reclaim-jobs"}
    assert len(state["metrics"]) == 6
    assert len(state["dashboards"]) == 1
    (policy,) = state["policies"].values()
    assert policy["displayName"] == "Sona service paused"


def test_the_alert_policy_waits_for_its_new_metric_type_instead_of_stopping_the_plan(
    org_project: Project,
) -> None:
    result = org_project.deploy()
    assert result.returncode == 0, result.stderr
    assert "waiting for the new log-based metric to reach Monitoring" in result.stderr
    refused = [c for c in org_project.calls("monitoring", "policies", "create")]
    assert len(refused) > 1  # 404s first, then created
    assert org_project.state["clock"] >= fake_gcloud.METRIC_DELAY_S


def test_under_domain_restricted_sharing_the_door_is_opened_by_disabling_the_invoker_check(
    org_project: Project,
) -> None:
    assert org_project.deploy().returncode == 0
    door = org_project.state["functions"]["process-job"]
    assert door["invoker_iam_check"] is False
    assert "allUsers" not in door["members"]
    assert org_project.state["functions"]["reclaim-jobs"]["invoker_iam_check"] is True


def test_where_allusers_is_allowed_the_door_gets_the_invoker_binding(tmp_path: Path) -> None:
    project = Project(tmp_path)
    assert project.deploy().returncode == 0
    door = project.state["functions"]["process-job"]
    assert "allUsers" in door["members"]
    assert door["invoker_iam_check"] is True


def test_every_function_is_built_by_the_named_build_service_account(org_project: Project) -> None:
    assert org_project.deploy().returncode == 0
    for function in org_project.state["functions"].values():
        assert function["build_service_account"] == (
            "projects/sona-test-project/serviceAccounts/sona-builder@sona-test-project.iam.gserviceaccount.com"
        )


def test_a_second_run_updates_everything_in_place_and_creates_nothing(org_project: Project) -> None:
    assert org_project.deploy().returncode == 0
    first = org_project.state
    second_run = org_project.deploy()
    assert second_run.returncode == 0, second_run.stderr
    second = org_project.state
    assert resources(second) == resources(first)
    (dashboard,) = second["dashboards"].values()
    assert dashboard["updates"] == 1  # updated with its etag, not refused
    new_calls = second["calls"][len(first["calls"]) :]
    created = [c[:3] for c in new_calls if "create" in c[:4] and "--validate-only" not in c]
    assert created == []


def test_the_dashboard_is_validated_before_it_is_written(org_project: Project) -> None:
    assert org_project.deploy().returncode == 0
    calls = org_project.calls("monitoring", "dashboards", "create")
    assert "--validate-only" in calls[0]


def test_the_pause_alert_notifies_the_configured_channels(org_project: Project) -> None:
    channel = "projects/sona-test-project/notificationChannels/12345"
    result = org_project.deploy({"_ALERT_NOTIFICATION_CHANNELS": channel})
    assert result.returncode == 0, result.stderr
    (policy,) = org_project.state["policies"].values()
    assert policy["notificationChannels"] == [channel]
