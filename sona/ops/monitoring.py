"""Cloud Monitoring in the deploy plan: log-based metrics read from the line that ends every attempt
(sona/job/pipeline.py, jsonPayload.event = ATTEMPT_EVENT) and from the one ERROR line a pause writes, a
dashboard of them, and an alert policy on pauses. The metric and dashboard definitions are JSON
files in monitoring/; everything is created the first time and updated in place after that.

The order follows what Monitoring accepts (DESIGN.md, Cloud Functions 2nd gen):
- metrics first: the dashboard charts them and the alert policy names one;
- the dashboard is checked with `dashboards create --validate-only` before it is written (each
  retried, as the alert policy is, while its metric types are new), and an
  update carries the dashboard's current etag: without one Monitoring refuses it ("Update Dashboard
  should specify a non empty etag", pulumi/pulumi-google-native#760);
- the alert policy last, retried while Monitoring still answers 404 for its metric type: a new
  log-based metric's type "could take up to 10 minutes to become available"
  (hashicorp/terraform-provider-google#11102; older servers said "The metric referenced by the
  provided filter is unknown", #10325). Nothing after it waits on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

MONITORING_DIR = Path(__file__).resolve().parents[2] / "monitoring"
METRICS_DIR = MONITORING_DIR / "metrics"
DASHBOARD_FILE = MONITORING_DIR / "dashboard.json"
DASHBOARD_NAME = "Sona operations"  # the dashboard's displayName: how a redeploy finds it again

# The stable `code` of process_job's one ERROR line per pause (sona.job.pipeline.PAUSE_LOG_CODE).
PAUSE_METRIC = "sona_service_paused"
PAUSE_POLICY = "Sona service paused"

# How long the plan waits for a new metric type to reach alert policies: Google says up to about
# 10 minutes; 15 leaves room, and every other failure stops the plan at once.
NEW_METRIC_WAIT_S, NEW_METRIC_POLL_S = 900, 30
NEW_METRIC_404 = ("Cannot find metric", "The metric referenced by the provided filter is unknown")

# Shell functions the plan's commands call (defined once, at its top).
RETRY_NEW_METRIC = "sona_retry_new_metric"
HELPERS = [
    f"{RETRY_NEW_METRIC}() {{  # run a command until Monitoring knows the new metric type",
    "  local out waited=0",
    '  until out="$("$@" 2>&1)"; do',
    "    if ! { "
    + " || ".join(f'[[ "$out" == *"{text}"* ]]' for text in NEW_METRIC_404)
    + f"; }} || (( waited >= {NEW_METRIC_WAIT_S} )); then",
    "      printf '%s\\n' \"$out\" >&2; return 1",
    "    fi",
    '    echo "waiting for the new log-based metric to reach Monitoring ($waited s)" >&2',
    f"    sleep {NEW_METRIC_POLL_S}; waited=$((waited + {NEW_METRIC_POLL_S}))",
    "  done",
    "  printf '%s\\n' \"$out\"",
    "}",
]


class Project(Protocol):
    @property
    def google_cloud_project(self) -> str: ...

    @property
    def alert_channels(self) -> list[str]: ...

    @property
    def job_services(self) -> list[str]: ...


class Line(Protocol):
    def __call__(self, argv: list[str]) -> str: ...


def metric_files() -> list[Path]:
    return sorted(METRICS_DIR.glob("*.json"))


def _relative(path: Path) -> str:
    # scripts/deploy.sh and Cloud Build run the plan from the repository root.
    return str(path.relative_to(MONITORING_DIR.parent))


def _upsert(describe: list[str], update: list[str], create: list[str], line: Line) -> list[str]:
    return [
        f"if {line(describe)} >/dev/null 2>&1; then",
        "  " + line(update),
        "else",
        "  " + line(create),
        "fi",
    ]


def metric_commands(config: Project, line: Line) -> list[str]:
    """Each metric: update in place when it exists, else create it (same definition either way)."""
    project = f"--project={config.google_cloud_project}"
    metrics = ["gcloud", "logging", "metrics"]
    commands = []
    for path in metric_files():
        name, config_file = path.stem, f"--config-from-file={_relative(path)}"
        commands += _upsert(
            [*metrics, "describe", name, project],
            [*metrics, "update", name, config_file, project],
            [*metrics, "create", name, config_file, project],
            line,
        )
    services = " OR ".join(f'"{name}"' for name in config.job_services)
    pause_filter = (
        f'resource.type="cloud_run_revision" AND resource.labels.service_name=({services})'
        f' AND severity>=ERROR AND jsonPayload.code="{PAUSE_METRIC}"'
    )
    commands += _upsert(
        [*metrics, "describe", PAUSE_METRIC, project],
        [*metrics, "update", PAUSE_METRIC, f"--log-filter={pause_filter}", project],
        [
            *metrics,
            "create",
            PAUSE_METRIC,
            "--description=Sona paused generation for an account-level outage",
            f"--log-filter={pause_filter}",
            project,
        ],
        line,
    )
    return commands


def dashboard_commands(config: Project, line: Line) -> list[str]:
    """Validated first; found by its display name, updated in place with its etag, or created once."""
    project = f"--project={config.google_cloud_project}"
    dashboards = ["gcloud", "monitoring", "dashboards"]
    config_file = f"--config-from-file={_relative(DASHBOARD_FILE)}"
    find = [
        *dashboards,
        "list",
        f'--filter=displayName="{DASHBOARD_NAME}"',
        "--format=value(name)",
        "--limit=1",
        project,
    ]
    etag = [*dashboards, "describe", "${SONA_DASHBOARD}", "--format=value(etag)", project]
    # The file plus the current etag, with the Python every gcloud install has.
    with_etag = [
        "python3",
        "-c",
        "import json, sys; d = json.load(open(sys.argv[1])); d['etag'] = sys.argv[2]; "
        "json.dump(d, open(sys.argv[3], 'w'))",
        _relative(DASHBOARD_FILE),
        "${SONA_DASHBOARD_ETAG}",
        "${SONA_DASHBOARD_FILE}",
    ]
    # Each write is retried while its new metric types are still unknown, as the alert's is: the
    # dashboard comes seconds after the metrics it charts.
    return [
        line([RETRY_NEW_METRIC, *dashboards, "create", "--validate-only", config_file, project]),
        f'SONA_DASHBOARD="$({line(find)})"',
        'if [[ -n "${SONA_DASHBOARD}" ]]; then',
        f'  SONA_DASHBOARD_ETAG="$({line(etag)})"',
        '  SONA_DASHBOARD_FILE="$(mktemp)"',
        "  " + line(with_etag),
        "  "
        + line(
            [
                RETRY_NEW_METRIC,
                *dashboards,
                "update",
                "${SONA_DASHBOARD}",
                "--config-from-file=${SONA_DASHBOARD_FILE}",
                project,
            ]
        ),
        '  rm -f "${SONA_DASHBOARD_FILE}"',
        "else",
        "  " + line([RETRY_NEW_METRIC, *dashboards, "create", config_file, project]),
        "fi",
    ]


def pause_policy(config: Project) -> dict[str, object]:
    """An account-level outage (key, credits, the provider's edge, Storage) pages whoever the
    notification channels name; the queue itself waits safely."""
    return {
        "displayName": PAUSE_POLICY,
        "combiner": "OR",
        "documentation": {
            "mimeType": "text/markdown",
            "content": "Sona paused generation: the provider or Storage refused the account (see the log "
            "line's `cause`). Jobs wait, nothing fails. Fix the key, credits or bucket; after the "
            "pause one probe job runs and lifts it. `python -m sona stats` shows the pause.",
        },
        "notificationChannels": config.alert_channels,
        "conditions": [
            {
                "displayName": "a pause was opened",
                "conditionThreshold": {
                    "filter": f'metric.type="logging.googleapis.com/user/{PAUSE_METRIC}"'
                    ' AND resource.type="cloud_run_revision"',
                    "comparison": "COMPARISON_GT",
                    "thresholdValue": 0,
                    "duration": "0s",
                    "aggregations": [{"alignmentPeriod": "300s", "perSeriesAligner": "ALIGN_SUM"}],
                },
            }
        ],
    }


def alert_commands(config: Project, line: Line) -> list[str]:
    """The policy has no natural id, so its display name finds it: replaced in place (channels
    included) when it exists, else created, retried while its new metric type is still unknown."""
    project = f"--project={config.google_cloud_project}"
    policies = ["gcloud", "monitoring", "policies"]
    policy = f"--policy={json.dumps(pause_policy(config))}"
    existing = [
        *policies,
        "list",
        f'--filter=displayName="{PAUSE_POLICY}"',
        "--format=value(name)",
        "--limit=1",
        project,
    ]
    return [
        f'SONA_POLICY="$({line(existing)})"',
        'if [[ -n "${SONA_POLICY}" ]]; then',
        "  " + line([RETRY_NEW_METRIC, *policies, "update", "${SONA_POLICY}", policy, project]),
        "else",
        "  " + line([RETRY_NEW_METRIC, *policies, "create", policy, project]),
        "fi",
    ]


def monitoring_commands(config: Project, line: Line) -> list[str]:
    """Metrics first (the dashboard and the alert name them), the alert last (it may wait)."""
    return [*metric_commands(config, line), *dashboard_commands(config, line), *alert_commands(config, line)]
