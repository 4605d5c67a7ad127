"""A stand-in for the `gcloud` CLI on PATH, for running scripts/deploy.sh end to end here.

It keeps every resource the plan touches in one JSON state file (FAKE_GCLOUD_STATE) and answers
the way the real CLI was documented or reported to answer where a first deploy meets trouble:
- a function's build in a project made after July 2024 fails unless it names a build service
  account with the roles (Cloud Functions, "Custom service account for Cloud Build"; the build's
  message as Google's troubleshooting page quotes it);
- an allUsers invoker binding is refused under the domain-restricted-sharing org policy with IAM's
  FAILED_PRECONDITION "do not belong to a permitted customer" (firebase/firebase-tools#2238), and
  `run services update --no-invoker-iam-check` is the documented way out (Cloud Run, "Allowing
  public (unauthenticated) access");
- an alert policy naming a log-based metric younger than METRIC_DELAY_S answers 404 "Cannot find
  metric(s) ... up to 10 minutes" (hashicorp/terraform-provider-google#11102);
- a dashboard update without the current etag is refused ("Update Dashboard should specify a non
  empty etag", pulumi/pulumi-google-native#760), and a stale one is ABORTED;
- creating what exists answers ALREADY_EXISTS, describing what does not answers NOT_FOUND;
- queue limits are Cloud Tasks' (500 dispatches/s, 5,000 concurrent), and --set-env-vars is split
  on its delimiter the way gcloud splits it (`gcloud topic escaping`), so a value that holds the
  delimiter breaks the variable;
- a function's traffic stays where `run services update-traffic --to-revisions` pinned it (a
  rollback) until a deploy passes --serve-all-traffic-latest-revision (Cloud Functions, "Traffic
  splitting": by default traffic goes to the latest revision; a custom split overrides that);
- a dashboard naming a log-based metric younger than METRIC_DELAY_S is refused like the alert
  policy (the strict side: Monitoring's docs promise nothing sooner);
- `artifacts repositories set-cleanup-policies` needs the repository, which the first function
  build creates (gcf-artifacts), and a policy file Artifact Registry can read.
Time is virtual: `sleep N` (a launcher that calls `--sleep N`) advances the clock, so waiting ten
minutes for Monitoring takes none.

The deploy-script tests make hundreds of calls a suite: `install(bin_dir)` puts `gcloud` and `sleep`
there as bash launchers that hand their argv to one server thread in the test process (`serve`),
which runs `call` and answers its output, error output and exit status for the launcher to print
and exit with: a bash start instead of a Python one per call.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import stat
import threading
import traceback
import uuid
from pathlib import Path
from typing import Any

State = dict[str, Any]

METRIC_DELAY_S = 180  # a new metric type is unknown to alert policies this long (Google: up to ~10 min)
BUILD_SA_MESSAGE = (
    "Build failed with status: FAILURE. Could not build the function due to a missing permission on "
    "the build service account. If you didn't revoke that permission explicitly, this could be caused "
    "by a change in the organization policies."
)
DRS_MESSAGE = (
    "FAILED_PRECONDITION: One or more users named in the policy do not belong to a permitted customer, "
    "perhaps due to an organization policy."
)
ETAG_MESSAGE = "INVALID_ARGUMENT: Update Dashboard should specify a non empty etag."
MAX_RATE, MAX_CONCURRENT = 500, 5000


class Refused(Exception):
    """What gcloud prints as `ERROR: (gcloud.<command>) <message>` with exit status 1."""


def new_state(*, drs: bool = False, new_project: bool = False) -> State:
    return {
        "clock": 0,
        "drs": drs,
        "new_project": new_project,
        "functions": {},
        "queues": {},
        "scheduler": {},
        "metrics": {},
        "dashboards": {},
        "policies": {},
        "account_bindings": [],
        "repositories": {},
        "calls": [],
    }


def parse(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    words, flags = [], {}
    for arg in argv:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            flags[name] = value
        else:
            words.append(arg)
    return words, flags


def env_vars(flag: str) -> dict[str, str]:
    """--set-env-vars as gcloud reads it: `^D^` first picks the delimiter D (default a comma)."""
    delimiter = ","
    match = re.match(r"\^(.+?)\^", flag)
    if match:
        delimiter, flag = match.group(1), flag[match.end() :]
    found = {}
    for item in flag.split(delimiter):
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise Refused(f"argument --set-env-vars: Bad syntax for dict arg: [{item}]")
        found[name] = value
    return found


def _need(table: dict[str, Any], name: str, kind: str) -> Any:
    if name not in table:
        raise Refused(f"NOT_FOUND: {kind} [{name}] not found.")
    return table[name]


def _fresh(table: dict[str, Any], name: str, kind: str) -> None:
    if name in table:
        raise Refused(f"ALREADY_EXISTS: {kind} [{name}] already exists.")


def functions(state: State, verb: str, words: list[str], flags: dict[str, str]) -> str:
    table = state["functions"]
    name = words[0]
    if verb == "deploy":
        if state["new_project"] and "build-service-account" not in flags:
            raise Refused(BUILD_SA_MESSAGE)
        existing = table.get(
            name, {"members": [], "invoker_iam_check": True, "revision": 0, "traffic": "latest"}
        )
        if "allow-unauthenticated" in flags:  # gcloud binds allUsers after the deploy: the strict side
            if state["drs"]:
                raise Refused(DRS_MESSAGE)
            existing["members"] = sorted({*existing["members"], "allUsers"})
        if "no-allow-unauthenticated" in flags:
            existing["members"] = [m for m in existing["members"] if m != "allUsers"]
        table[name] = {
            **existing,
            "entry_point": flags["entry-point"],
            "env": env_vars(flags.get("set-env-vars", "")),
            "service_account": flags.get("service-account"),
            "build_service_account": flags.get("build-service-account"),
            "secrets": sorted(i.split("=", 1)[0] for i in flags.get("set-secrets", "").split(",") if i),
            "size": {k: flags.get(k) for k in ("timeout", "memory", "cpu", "concurrency", "max-instances")},
            "revision": existing["revision"] + 1,
        }
        if "serve-all-traffic-latest-revision" in flags:
            table[name]["traffic"] = "latest"
        location = flags.get("region", "")
        state["repositories"].setdefault(f"{location}/gcf-artifacts", {"cleanup": None})
        return ""
    function = _need(table, name, "Function")
    if verb == "describe":
        return f"https://{name}-abc123-uc.a.run.app"
    if verb == "add-invoker-policy-binding":
        member = flags["member"]
        if member == "allUsers" and state["drs"]:
            raise Refused(DRS_MESSAGE)
        if member not in function["members"]:
            function["members"].append(member)
        return ""
    raise Refused(f"Invalid choice: {verb}")


def run_services(state: State, verb: str, words: list[str], flags: dict[str, str]) -> str:
    function = _need(state["functions"], words[0], "Service")
    if verb == "update" and "no-invoker-iam-check" in flags:
        function["invoker_iam_check"] = False
        return ""
    if verb == "update-traffic" and "to-revisions" in flags:
        function["traffic"] = flags["to-revisions"]
        return ""
    raise Refused(f"Invalid choice: {verb}")


def artifacts_repositories(state: State, verb: str, words: list[str], flags: dict[str, str]) -> str:
    if verb != "set-cleanup-policies":
        raise Refused(f"Invalid choice: {verb}")
    repository = _need(state["repositories"], f"{flags.get('location')}/{words[0]}", "Repository")
    try:
        policies = json.loads(Path(flags["policy"]).read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise Refused(f"INVALID_ARGUMENT: the cleanup policy could not be read: {exc}") from None
    if not isinstance(policies, list) or not all({"name", "action"} <= set(p) for p in policies):
        raise Refused("INVALID_ARGUMENT: a cleanup policy file is a list of policies with a name and action")
    repository["cleanup"] = policies if "dry-run" not in flags else repository["cleanup"]
    return ""


def tasks_queues(state: State, verb: str, words: list[str], flags: dict[str, str]) -> str:
    table, name = state["queues"], words[0]
    if verb == "describe":
        return json.dumps(_need(table, name, "Queue"))
    if verb == "add-iam-policy-binding":
        members = _need(table, name, "Queue").setdefault("members", [])
        if [flags["member"], flags["role"]] not in members:  # IAM bindings are a set
            members.append([flags["member"], flags["role"]])
        return ""
    if verb == "create":
        _fresh(table, name, "Queue")
    elif verb == "update":
        _need(table, name, "Queue")
    else:
        raise Refused(f"Invalid choice: {verb}")
    rate, concurrent = float(flags["max-dispatches-per-second"]), int(flags["max-concurrent-dispatches"])
    if not 0 < rate <= MAX_RATE or not 0 < concurrent <= MAX_CONCURRENT:
        raise Refused("INVALID_ARGUMENT: Queue rate limits are out of range.")
    table[name] = {**table.get(name, {}), "flags": flags}
    return ""


def scheduler_jobs(state: State, verb: str, words: list[str], flags: dict[str, str]) -> str:
    table = state["scheduler"]
    if verb == "describe":
        return json.dumps(_need(table, words[0], "Job"))
    name = words[1]  # create http NAME / update http NAME
    if verb == "create":
        _fresh(table, name, "Job")
    elif verb == "update":
        _need(table, name, "Job")
    else:
        raise Refused(f"Invalid choice: {verb}")
    table[name] = flags
    return ""


def logging_metrics(state: State, verb: str, words: list[str], flags: dict[str, str]) -> str:
    table, name = state["metrics"], words[0]
    if verb == "describe":
        return json.dumps(_need(table, name, "Metric"))
    if verb == "create":
        _fresh(table, name, "Metric")
        table[name] = {"created_at": state["clock"], "flags": flags}
    elif verb == "update":
        _need(table, name, "Metric")["flags"] = flags
    else:
        raise Refused(f"Invalid choice: {verb}")
    return ""


def _display_name_filter(flags: dict[str, str]) -> str:
    match = re.fullmatch(r'displayName="(.*)"', flags.get("filter", ""))
    if not match:
        raise Refused("INVALID_ARGUMENT: this stand-in lists by displayName only")
    return match.group(1)


def _dashboard_file(flags: dict[str, str]) -> dict[str, Any]:
    try:
        dashboard = json.loads(Path(flags["config-from-file"]).read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise Refused(f"INVALID_ARGUMENT: the dashboard could not be read: {exc}") from None
    if not dashboard.get("displayName") or not any(
        k in dashboard for k in ("mosaicLayout", "gridLayout", "rowLayout", "columnLayout")
    ):
        raise Refused("INVALID_ARGUMENT: a dashboard needs a displayName and a layout")
    return dict(dashboard)


def monitoring_dashboards(state: State, verb: str, words: list[str], flags: dict[str, str]) -> str:
    table = state["dashboards"]
    if verb == "list":
        wanted = _display_name_filter(flags)
        return "\n".join(n for n, d in table.items() if d["config"]["displayName"] == wanted)
    if verb == "create":
        dashboard = _dashboard_file(flags)
        _known_metrics(state, dashboard)
        if "validate-only" not in flags:
            name = f"projects/{flags['project']}/dashboards/{uuid.uuid4()}"
            table[name] = {"config": dashboard, "etag": uuid.uuid4().hex, "updates": 0}
        return ""
    current = _need(table, words[0], "Dashboard")
    if verb == "describe":
        return str(current["etag"])
    if verb == "update":
        dashboard = _dashboard_file(flags)
        if not dashboard.get("etag"):
            raise Refused(ETAG_MESSAGE)
        _known_metrics(state, dashboard)
        if dashboard["etag"] != current["etag"]:
            raise Refused("ABORTED: The dashboard was modified concurrently (etag mismatch).")
        current.update(config=dashboard, etag=uuid.uuid4().hex, updates=current["updates"] + 1)
        return ""
    raise Refused(f"Invalid choice: {verb}")


def _known_metrics(state: State, policy: dict[str, Any]) -> None:
    """Refuse, as Monitoring does for a while, a definition naming a metric type still new."""
    for metric in re.findall(r"logging\.googleapis\.com/user/(\w+)", json.dumps(policy)):
        known = state["metrics"].get(metric)
        if known is None or state["clock"] < known["created_at"] + METRIC_DELAY_S:
            raise Refused(
                f'NOT_FOUND: Cannot find metric(s) that match type = "logging.googleapis.com/user/{metric}". '
                "If a metric was created recently, it could take up to 10 minutes to become available. "
                "Please try again soon."
            )


def monitoring_policies(state: State, verb: str, words: list[str], flags: dict[str, str]) -> str:
    table = state["policies"]
    if verb == "list":
        wanted = _display_name_filter(flags)
        return "\n".join(n for n, p in table.items() if p["displayName"] == wanted)
    if verb not in ("create", "update"):
        raise Refused(f"Invalid choice: {verb}")
    policy = json.loads(flags["policy"])
    _known_metrics(state, policy)
    for channel in policy.get("notificationChannels", []):
        if not re.fullmatch(r"projects/[^/]+/notificationChannels/[^/]+", channel):
            raise Refused(f"INVALID_ARGUMENT: {channel} is not a notification channel name")
    if verb == "create":
        table[f"projects/{flags['project']}/alertPolicies/{uuid.uuid4().hex[:12]}"] = policy
    else:
        _need(table, words[0], "Alert policy")
        table[words[0]] = policy
    return ""


def iam_service_accounts(state: State, verb: str, words: list[str], flags: dict[str, str]) -> str:
    if verb != "add-iam-policy-binding":
        raise Refused(f"Invalid choice: {verb}")
    binding = [words[0], flags["member"], flags["role"]]
    if binding not in state["account_bindings"]:
        state["account_bindings"].append(binding)
    return ""


GROUPS = {
    ("functions",): functions,
    ("run", "services"): run_services,
    ("tasks", "queues"): tasks_queues,
    ("scheduler", "jobs"): scheduler_jobs,
    ("logging", "metrics"): logging_metrics,
    ("monitoring", "dashboards"): monitoring_dashboards,
    ("monitoring", "policies"): monitoring_policies,
    ("iam", "service-accounts"): iam_service_accounts,
    ("artifacts", "repositories"): artifacts_repositories,
}


def gcloud(state: State, argv: list[str]) -> str:
    words, flags = parse(argv)
    for group, handler in GROUPS.items():
        if tuple(words[: len(group)]) == group and len(words) > len(group):
            verb = words[len(group)]
            return handler(state, verb, words[len(group) + 1 :], flags)
    raise Refused(f"Invalid choice: {' '.join(words)}")


def call(path: str, argv: list[str]) -> tuple[int, str, str]:
    """One gcloud call against the state file at path: its exit status, output and error output."""
    state_file = Path(path)
    state = json.loads(state_file.read_text())
    if argv[:1] == ["--sleep"]:
        state["clock"] += float(argv[1])
        state_file.write_text(json.dumps(state))
        return 0, "", ""
    state["calls"].append(argv)
    command = ".".join([w for w in argv if not w.startswith("--")][:3])
    try:
        out = gcloud(state, argv)
    except Refused as exc:
        state_file.write_text(json.dumps(state))
        return 1, "", f"ERROR: (gcloud.{command}) {exc}\n"
    state_file.write_text(json.dumps(state))
    return 0, f"{out}\n" if out else "", ""


# -- the launchers and their server (see the module's docstring) -----------------------------------

# bash's /dev/tcp opens the connection; the request is NUL-separated fields (their count, the state
# file, the argv), the answer a few shell words that print what the call printed and exit with its
# status, read up to the NUL that ends it.
LAUNCHER = """#!/bin/bash
# A fake `{name}` (tests/fake_gcloud.py): this test process's fake gcloud server answers the call.
exec 3<>/dev/tcp/127.0.0.1/{port} || exit 70
printf '%s\\0' "$(($# + {extra}))" "${{FAKE_GCLOUD_STATE-}}" {prefix}"$@" >&3
IFS= read -r -d '' answer <&3
eval "$answer"
"""
_server: list[int] = []  # the port of this process's server, once started


def install(bin_dir: Path) -> None:
    """`gcloud` and `sleep` in bin_dir, answered by this process's server (started on first use)."""
    if not _server:
        _server.append(_start_server())
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, prefix in (("gcloud", ""), ("sleep", "--sleep ")):
        script = bin_dir / name
        extra = 1 if prefix else 0
        script.write_text(LAUNCHER.format(name=name, port=_server[0], extra=extra, prefix=prefix))
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _start_server() -> int:
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=serve, args=(listener,), name="fake-gcloud", daemon=True).start()
    return int(listener.getsockname()[1])


def serve(listener: socket.socket) -> None:
    """One call at a time, in arrival order, as the calls of one deploy script are made."""
    while True:
        connection, _ = listener.accept()
        with connection:
            try:
                connection.sendall(_answer(_request(connection)).encode() + b"\0")
            except (OSError, ValueError):  # a launcher killed mid-call: its caller sees it fail
                continue


def _request(connection: socket.socket) -> list[str]:
    data = b""
    while True:
        fields = data.split(b"\0")
        if len(fields) > 1 and len(fields) - 1 >= int(fields[0]) + 2:  # the count, the state file, argv
            return [f.decode() for f in fields[1 : int(fields[0]) + 2]]
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError("the launcher hung up mid-request")
        data += chunk


def _answer(request: list[str]) -> str:
    """The shell words that print what the call printed and exit with its status."""
    path, argv = request[0], request[1:]
    try:
        if not path:
            raise KeyError("FAKE_GCLOUD_STATE")
        status, out, err = call(path, argv)
    except Exception:  # what a crashing CLI would print: its traceback, and status 1
        status, out, err = 1, "", traceback.format_exc()
    return f"printf %s {shlex.quote(out)}; printf %s {shlex.quote(err)} >&2; exit {status}"
