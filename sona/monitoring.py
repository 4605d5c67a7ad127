"""Cloud Monitoring in the deploy plan: log-based metrics read from the line that ends every attempt
(sona/pipeline.py, jsonPayload.event = ATTEMPT_EVENT), and a dashboard of them. Both are JSON files
in monitoring/, created the first time and updated in place after that."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

MONITORING_DIR = Path(__file__).resolve().parents[1] / "monitoring"
METRICS_DIR = MONITORING_DIR / "metrics"
DASHBOARD_FILE = MONITORING_DIR / "dashboard.json"
DASHBOARD_NAME = "Sona operations"  # the dashboard's displayName: how a redeploy finds it again


class Project(Protocol):
    google_cloud_project: str


class Line(Protocol):
    def __call__(self, argv: list[str]) -> str: ...


def metric_files() -> list[Path]:
    return sorted(METRICS_DIR.glob("*.json"))


def _relative(path: Path) -> str:
    # scripts/deploy.sh and Cloud Build run the plan from the repository root.
    return str(path.relative_to(MONITORING_DIR.parent))


def metric_commands(config: Project, line: Line) -> list[str]:
    """Each metric: update in place when it exists, else create it (same file either way)."""
    project = f"--project={config.google_cloud_project}"
    metrics = ["gcloud", "logging", "metrics"]
    commands = []
    for path in metric_files():
        name, config_file = path.stem, f"--config-from-file={_relative(path)}"
        commands += [
            f"if {line([*metrics, 'describe', name, project])} >/dev/null 2>&1; then",
            "  " + line([*metrics, "update", name, config_file, project]),
            "else",
            "  " + line([*metrics, "create", name, config_file, project]),
            "fi",
        ]
    return commands


def dashboard_commands(config: Project, line: Line) -> list[str]:
    """The dashboard is found by its display name: update it in place, or create it once."""
    project = f"--project={config.google_cloud_project}"
    dashboards = ["gcloud", "monitoring", "dashboards"]
    config_file = f"--config-from-file={_relative(DASHBOARD_FILE)}"
    find = line(
        [
            *dashboards,
            "list",
            f'--filter=displayName="{DASHBOARD_NAME}"',
            "--format=value(name)",
            "--limit=1",
            project,
        ]
    )
    return [
        f'SONA_DASHBOARD="$({find})"',
        'if [[ -n "${SONA_DASHBOARD}" ]]; then',
        "  " + line([*dashboards, "update", "${SONA_DASHBOARD}", config_file, project]),
        "else",
        "  " + line([*dashboards, "create", config_file, project]),
        "fi",
    ]


def monitoring_commands(config: Project, line: Line) -> list[str]:
    """Metrics first: the dashboard's charts name them."""
    return [*metric_commands(config, line), *dashboard_commands(config, line)]
