"""Both deploy paths run for real against a `gcloud` on PATH that answers like the real one where a
first deploy meets trouble (tests/fake_gcloud.py: a new metric type's 404, the dashboard's etag, the
domain-restricted-sharing refusal, the build service account, a rollback's traffic pin):
scripts/deploy.sh from the checkout, and Cloud Build's plan and deploy steps in an upload-shaped
copy (what .gcloudignore-build lets through, no .git/). The plan must complete, and a second run must
change nothing but update in place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import fake_gcloud
from tests.test_deploy import PROJECT, REPO, cloudbuild, deploy_settings, write_settings
from tests.test_gcloudignore import build_ignore_file, copy_upload

pytestmark = pytest.mark.slow  # real processes (tests/conftest.py starts such files first)


class Project:
    """One fake Google Cloud project and the deploy paths run against it."""

    def __init__(self, tmp_path: Path, **scenario: bool) -> None:
        self.tmp = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.state_file = tmp_path / "gcloud-state.json"
        self.state_file.write_text(json.dumps(fake_gcloud.new_state(**scenario)))
        self.bin = tmp_path / "bin"
        fake_gcloud.install(self.bin)  # `gcloud` and `sleep`, answered by this process's fake

    @property
    def state(self) -> dict[str, Any]:
        return dict(json.loads(self.state_file.read_text()))

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", "/tmp"),
            "FAKE_GCLOUD_STATE": str(self.state_file),
            **extra,
        }

    def deploy(self, overrides: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """scripts/deploy.sh, from the checkout, with its deploy.env."""
        settings = write_settings(deploy_settings(overrides), self.tmp)
        env = self.env(PYTHON=sys.executable, PYTHONPATH=str(REPO), DEPLOY_SETTINGS=str(settings))
        return run([str(REPO / "scripts" / "deploy.sh")], REPO, env)

    def build(self, overrides: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Cloud Build's plan and deploy steps as the build runs them: in the upload (with the
        operator's deploy.env at its root and the .venv the test step made), with the step's env."""
        workspace = copy_upload(build_ignore_file(), self.tmp / f"workspace-{len(self.state['calls'])}")
        write_settings(deploy_settings(overrides), workspace)
        (workspace / ".venv").symlink_to(Path(sys.prefix))
        steps = {s["id"]: s for s in cloudbuild()["steps"]}
        for step_id in ("plan", "deploy"):
            step = steps[step_id]
            step_env = dict(item.split("=", 1) for item in step.get("env", []))
            step_env = {k: v.replace("$PROJECT_ID", PROJECT) for k, v in step_env.items()}
            argv = [a.replace("/workspace", str(workspace)) for a in [step["entrypoint"], *step["args"]]]
            result = run(argv, workspace, self.env(**step_env))
            if result.returncode != 0:
                return result
        return result

    def calls(self, *words: str) -> list[list[str]]:
        return [c for c in self.state["calls"] if c[: len(words)] == list(words)]


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)


# Each test has a project of its own, so the file's tests may spread over workers: the Cloud Build
# path's and the door's tests run as groups of their own (tests/conftest.py), beside the rest.
BY_CLOUD_BUILD = pytest.mark.xdist_group("deploy script: cloud build")
THE_DOOR = pytest.mark.xdist_group("deploy script: the door")
PATHS = ["deploy.sh", pytest.param("cloud build", marks=BY_CLOUD_BUILD)]


def deploy_by(
    project: Project, path: str, overrides: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return project.deploy(overrides) if path == "deploy.sh" else project.build(overrides)


def resources(state: dict[str, Any]) -> dict[str, list[str]]:
    kinds = ("functions", "queues", "scheduler", "metrics", "dashboards", "policies")
    return {kind: sorted(state[kind]) for kind in kinds}


@pytest.fixture
def org_project(tmp_path: Path) -> Project:
    """A project made after July 2024, in an organisation that enforces domain restricted sharing."""
    return Project(tmp_path, drs=True, new_project=True)


@pytest.mark.parametrize("path", PATHS)
def test_a_first_deploy_completes_in_a_new_org_project(org_project: Project, path: str) -> None:
    result = deploy_by(org_project, path)
    assert result.returncode == 0, result.stderr
    state = org_project.state
    assert set(state["functions"]) == {"process-job", "run-job", "reclaim-jobs"}
    assert len(state["metrics"]) == 6
    assert len(state["dashboards"]) == 1
    (policy,) = state["policies"].values()
    assert policy["displayName"] == "Sona service paused"


def test_monitoring_waits_for_its_new_metric_types_instead_of_stopping_the_plan(
    org_project: Project,
) -> None:
    """The dashboard comes seconds after the metrics it charts, the alert policy after it: each
    write is retried while Monitoring still answers 404 for a new metric type."""
    result = org_project.deploy()
    assert result.returncode == 0, result.stderr
    assert "waiting for the new log-based metric to reach Monitoring" in result.stderr
    refused = org_project.calls("monitoring", "dashboards", "create")
    assert len(refused) > 2  # 404s first, then validated and created
    assert org_project.state["clock"] >= fake_gcloud.METRIC_DELAY_S
    assert len(org_project.state["dashboards"]) == 1 and len(org_project.state["policies"]) == 1


@THE_DOOR
def test_under_domain_restricted_sharing_the_door_is_opened_by_disabling_the_invoker_check(
    org_project: Project,
) -> None:
    assert org_project.deploy().returncode == 0
    door = org_project.state["functions"]["process-job"]
    assert door["invoker_iam_check"] is False
    assert "allUsers" not in door["members"]
    assert org_project.state["functions"]["reclaim-jobs"]["invoker_iam_check"] is True


@THE_DOOR
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


def configuration(state: dict[str, Any]) -> dict[str, Any]:
    """Every resource as deployed, without what each deploy renews (revisions, etags, the call log)."""
    functions = {n: {k: v for k, v in f.items() if k != "revision"} for n, f in state["functions"].items()}
    dashboards = [d["config"] | {"etag": None} for d in state["dashboards"].values()]
    policies = {p["displayName"]: p for p in state["policies"].values()}  # names are the server's
    keep = ("queues", "scheduler", "account_bindings", "repositories")
    return {
        "functions": functions,
        "dashboards": dashboards,
        "policies": policies,
        **{k: state[k] for k in keep},
    }


@pytest.mark.parametrize("path", PATHS)
def test_a_second_run_updates_everything_in_place_and_creates_nothing(
    org_project: Project, path: str
) -> None:
    first_run = deploy_by(org_project, path)
    assert first_run.returncode == 0, first_run.stderr
    first = org_project.state
    second_run = deploy_by(org_project, path)
    assert second_run.returncode == 0, second_run.stderr
    second = org_project.state
    assert resources(second) == resources(first)
    (dashboard,) = second["dashboards"].values()
    assert dashboard["updates"] == 1  # updated with its etag, not refused
    new_calls = second["calls"][len(first["calls"]) :]
    created = [c[:3] for c in new_calls if "create" in c[:4] and "--validate-only" not in c]
    assert created == []
    assert configuration(second) == configuration(first)


def test_the_dashboard_is_validated_before_it_is_written(org_project: Project) -> None:
    assert org_project.deploy().returncode == 0
    calls = org_project.calls("monitoring", "dashboards", "create")
    assert "--validate-only" in calls[0]


def test_the_pause_alert_notifies_the_configured_channels(org_project: Project) -> None:
    channel = "projects/sona-test-project/notificationChannels/12345"
    result = org_project.deploy({"ALERT_NOTIFICATION_CHANNELS": channel})
    assert result.returncode == 0, result.stderr
    (policy,) = org_project.state["policies"].values()
    assert policy["notificationChannels"] == [channel]


# -- issue 31 --------------------------------------------------------------------------------------

# Settings a first deploy.sh deploy carries and a Cloud Build deploy used to reset or drop.
OPERATOR_SETTINGS = {
    "REGION": "europe-west1",
    "SUPABASE_STORAGE_BUCKET": "plugin-audio",
    "DESIGNER_MODEL": "tangoflux",
    "STORAGE_PATH_PREFIX": "gen$HOME",  # a `$` the shell must not expand
}


@BY_CLOUD_BUILD
def test_cloud_build_deploys_exactly_what_deploy_sh_deploys(tmp_path: Path) -> None:
    by_script, by_build = Project(tmp_path / "a"), Project(tmp_path / "b")
    for project, path in ((by_script, "deploy.sh"), (by_build, "cloud build")):
        result = deploy_by(project, path, OPERATOR_SETTINGS)
        assert result.returncode == 0, result.stderr
    assert configuration(by_build.state) == configuration(by_script.state)
    worker = by_build.state["functions"]["run-job"]
    assert "REPLICATE_API_TOKEN" in worker["secrets"]
    assert {k: worker["env"][k] for k in OPERATOR_SETTINGS if k != "REGION"} == {
        k: v for k, v in OPERATOR_SETTINGS.items() if k != "REGION"
    }
    reclaim = by_build.state["functions"]["reclaim-jobs"]["env"]
    assert reclaim["STORAGE_PATH_PREFIX"] == "gen$HOME"
    assert reclaim["PROCESS_JOB_URL"].startswith("https://process-job-")  # expanded, as meant


@BY_CLOUD_BUILD
def test_the_build_refuses_to_deploy_without_the_settings_file(tmp_path: Path) -> None:
    project = Project(tmp_path)
    workspace = copy_upload(build_ignore_file(), tmp_path / "workspace")
    (workspace / ".venv").symlink_to(Path(sys.prefix))
    (plan,) = [s for s in cloudbuild()["steps"] if s["id"] == "plan"]
    result = run(
        ["bash", "-c", plan["args"][1].replace("/workspace", str(workspace))],
        workspace,
        project.env(GOOGLE_CLOUD_PROJECT=PROJECT),
    )
    assert result.returncode != 0
    assert "deploy.env not found" in result.stderr
    assert project.state["calls"] == []


@pytest.mark.parametrize("path", PATHS)
def test_a_deploy_after_a_rollback_serves_the_new_revision(tmp_path: Path, path: str) -> None:
    project = Project(tmp_path)
    assert deploy_by(project, path).returncode == 0
    for name in ("process-job", "run-job", "reclaim-jobs"):  # DEPLOYMENT.md, 9: the rollback
        pin = ["run", "services", "update-traffic", name, f"--to-revisions={name}-00001=100"]
        subprocess.run(["gcloud", *pin], env=project.env(), check=True)
    assert {f["traffic"] for f in project.state["functions"].values()} != {"latest"}
    assert deploy_by(project, path).returncode == 0
    assert {f["traffic"] for f in project.state["functions"].values()} == {"latest"}


@THE_DOOR
def test_the_door_holds_only_the_webhook_secret_and_reclaim_may_list_the_queue(org_project: Project) -> None:
    assert org_project.deploy().returncode == 0
    functions = org_project.state["functions"]
    assert functions["process-job"]["secrets"] == ["WEBHOOK_SECRET"]
    assert functions["run-job"]["secrets"] == [
        "STABLE_AUDIO_API_KEY",
        "SUPABASE_SERVICE_ROLE_KEY",
        "WEBHOOK_SECRET",
    ]
    runtime = f"serviceAccount:sona-functions@{PROJECT}.iam.gserviceaccount.com"
    assert [runtime, "roles/cloudtasks.viewer"] in org_project.state["queues"]["sona-jobs"]["members"]


def test_old_function_images_are_cleaned_up_by_policy(org_project: Project) -> None:
    assert org_project.deploy().returncode == 0
    (repository,) = org_project.state["repositories"].values()
    kept = [p for p in repository["cleanup"] if p["action"]["type"] == "Keep"]
    assert kept and kept[0]["mostRecentVersions"]["keepCount"] >= 2  # a rollback finds its image
