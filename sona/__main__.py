"""`python -m sona COMMAND`: validate, doctor, reclaim, deploy-plan, webhook-sql, stats (what operators run
against a deployment). The local world's commands (demo, dev, bench) are `python -m devstack`."""

from __future__ import annotations

import argparse
import json
import sys

from sona.config import ConfigError, load, load_settings


def _validate(_: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    from sona.audio.ffmpeg import find_ffmpeg
    from sona.errors import FfmpegMissing

    try:
        ffmpeg = find_ffmpeg(settings.ffmpeg_binary)
    except FfmpegMissing as exc:
        print(f"Invalid configuration:\n  - {exc}", file=sys.stderr)
        return 1
    import os

    from sona.config import ignored_settings

    for warning in [*settings.warnings(), *ignored_settings(os.environ)]:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"Configuration is valid (function timeout {settings.function_timeout_s} s, "
        f"lease {settings.lease_seconds} s, model {settings.stable_audio_model}, ffmpeg {ffmpeg})."
    )
    return 0


def _doctor(args: argparse.Namespace) -> int:
    """Exit 1 while any hole is open, so a deploy script can stop on it."""
    from dataclasses import asdict

    from sona.ops.doctor import find_holes, render

    findings = find_holes(args.database_url)
    print(json.dumps([asdict(f) for f in findings], indent=2) if args.json else render(findings))
    return 1 if findings else 0


def _reclaim(_: argparse.Namespace) -> int:
    from sona.errors import DatabaseUnavailable
    from sona.job.reclaim import run_reclaim
    from sona.services import Services

    try:
        summary = run_reclaim(Services(load_settings()))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except DatabaseUnavailable as exc:
        print(f"reclaim failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


def _deploy_plan(_: argparse.Namespace) -> int:
    from sona.ops.deploy import not_deployed, plan_from_file, render

    try:
        plan = plan_from_file()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    for note in not_deployed(plan.env):
        print(f"note: {note}", file=sys.stderr)
    sys.stdout.write(render(plan))
    return 0


def _webhook_sql(args: argparse.Namespace) -> int:
    from sona.config import WebhookSecret
    from sona.ops.webhook_sql import WebhookConfig, webhook_sql

    try:
        config = load(WebhookConfig)
        secret = None if args.vault else load(WebhookSecret).webhook_secret
        print(webhook_sql(config, args.url, secret=secret, vault_secret=args.vault))
    except (ConfigError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _stats(args: argparse.Namespace) -> int:
    from sona.ops.stats import credits_spent, fold_settled_hours, render_table
    from sona.store.jobs import JobsStore

    try:
        # Only the database is read: how jobs are dispatched does not matter here.
        # A window of a month over a large table takes seconds, not the claim's 10 s budget.
        settings = load_settings(dispatch="direct")
        store = JobsStore(settings, timeout_s=120)
        note = fold_settled_hours(store)  # what the scheduler's reclaim has not folded yet
        if note:
            print(note, file=sys.stderr)
        figures = store.stats(args.hours)
        figures["spend"] = store.spend_stats(args.hours)  # the pause, quota refusals, cancellations
        figures["tokens"] = store.token_stats(args.hours)  # the plug-in's tokens refunded
        # Paid generations per model, priced by MODEL_CREDITS (Stable Audio 3's price is unresolved).
        figures["credits"] = credits_spent(store.generation_stats(args.hours), settings.model_credits)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(figures, indent=2) if args.json else render_table(figures))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sona", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("validate", help="check the configuration").set_defaults(run=_validate)
    doctor = commands.add_parser(
        "doctor", help="list the grants that let anon or users mint tokens, change settings or clear audio"
    )
    doctor.add_argument("--database-url", required=True, help="the database (postgresql://...)")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(run=_doctor)
    commands.add_parser("reclaim", help="run reclaim_jobs once").set_defaults(run=_reclaim)
    commands.add_parser(
        "deploy-plan", help="print the gcloud commands that deploy both functions"
    ).set_defaults(run=_deploy_plan)
    hook = commands.add_parser("webhook-sql", help="print the SQL that installs the INSERT webhook")
    hook.add_argument("--url", required=True, help="the deployed process_job URL")
    hook.add_argument("--vault", metavar="NAME", help="read the secret from Supabase Vault at send time")
    hook.set_defaults(run=_webhook_sql)
    stats = commands.add_parser("stats", help="monitoring figures from the jobs table")
    stats.add_argument("--hours", type=int, default=24, help="the window (default 24)")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(run=_stats)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
