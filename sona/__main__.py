"""`python -m sona COMMAND`: validate, demo, dev, reclaim, deploy-plan, webhook-sql, stats."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sona.config import ConfigError, load, load_settings


def _validate(_: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    from sona.errors import FfmpegMissing
    from sona.ffmpeg import find_ffmpeg

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


def _strength(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be 0 to 1")
    return value


def _demo(args: argparse.Namespace) -> int:
    from sona.local.demo import PluginRequest, demo

    try:
        plugin = PluginRequest(args.mode, args.bpm, args.key) if args.mode else None
        return demo(args.prompt, args.duration, args.quality, args.input, args.strength, plugin, args.model)
    except ConfigError as exc:  # raised before the stack starts anything
        print(exc, file=sys.stderr)
        return 1


def _dev(args: argparse.Namespace) -> int:
    from sona.local.demo import dev

    ports = {
        name: port
        for name, port in (
            ("gateway", args.gateway_port),
            ("process_job", args.process_job_port),
            ("reclaim_jobs", args.reclaim_jobs_port),
        )
        if port
    }
    try:
        return dev(args.json, ports, database_url=args.database_url)
    except ConfigError as exc:  # raised before the stack starts anything
        print(exc, file=sys.stderr)
        return 1


def _reclaim(_: argparse.Namespace) -> int:
    from sona.errors import DatabaseUnavailable
    from sona.reclaim import run_reclaim
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
    from sona.deploy import not_deployed, plan_from_file, render

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
    from sona.webhook_sql import WebhookConfig, webhook_sql

    try:
        config = load(WebhookConfig)
        secret = None if args.vault else load(WebhookSecret).webhook_secret
        print(webhook_sql(config, args.url, secret=secret, vault_secret=args.vault))
    except (ConfigError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _stats(args: argparse.Namespace) -> int:
    from sona.jobs_store import JobsStore
    from sona.stats import credits_spent, fold_settled_hours, render_table

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


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sona.local.bench import main as bench

    return bench(args.runs, Path(args.out), args.burst_jobs, args.only)


def _seconds(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 380:
        raise argparse.ArgumentTypeError(f"must be 1 to 380 seconds, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sona", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("validate", help="check the configuration").set_defaults(run=_validate)
    demo = commands.add_parser("demo", help="run one job end to end on the local stack")
    demo.add_argument("prompt")
    demo.add_argument(
        "--duration",
        type=_seconds,
        default=10,
        help="1 to 380 seconds (default 10); past 190 s only stable-audio-3 makes it all, past 180 s"
        " only on this project's own table (the plug-in's allows 180)",
    )
    demo.add_argument(
        "--model",
        choices=["stable-audio-2.5", "stable-audio-2", "stable-audio-3"],
        help="the model for every mode (else DESIGNER_MODEL, PRODUCER_MODEL, CREATOR_MODEL and"
        " STABLE_AUDIO_MODEL from the environment; stable-audio-2.5 by default)",
    )
    demo.add_argument("--quality", choices=["low", "medium", "high", "draft", "standard"], default="medium")
    demo.add_argument(
        "--mode",
        choices=["designer", "producer", "creator"],
        help="insert as the plug-in's generate function does (service role, queued) in this mode",
    )
    demo.add_argument("--bpm", type=float, help="with --mode producer or creator")
    demo.add_argument("--key", help="with --mode: a musical key and scale, e.g. 'A minor'")
    demo.add_argument(
        "--input", type=Path, help="audio-to-audio: an MP3 or WAV of 6 to 190 s, uploaded as the user would"
    )
    demo.add_argument("--strength", type=_strength, help="audio-to-audio: 0 keeps the input, 1 ignores it")
    demo.set_defaults(run=_demo)
    dev = commands.add_parser("dev", help="run the local stack until interrupted")
    dev.add_argument("--json", action="store_true", help="print one JSON line once ready")
    dev.add_argument("--gateway-port", type=int, default=0, help="Supabase gateway port (default: free)")
    dev.add_argument("--process-job-port", type=int, default=0, help="process_job port (default: free)")
    dev.add_argument("--reclaim-jobs-port", type=int, default=0, help="reclaim_jobs port (default: free)")
    dev.add_argument(
        "--database-url",
        help="run on this existing PostgreSQL (e.g. a copy of production) instead of an embedded one: "
        "Supabase's roles and schemas are added where missing, the migrations applied, no row dropped",
    )
    dev.set_defaults(run=_dev)
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
    bench = commands.add_parser(
        "bench", help="cold start, job overhead, memory, throughput, reclaim, dispatch modes"
    )
    bench.add_argument("--runs", type=int, default=5, help="runs per figure (median, min, max)")
    bench.add_argument("--out", default="bench-results.json", help="where the JSON goes")
    bench.add_argument("--burst-jobs", type=int, default=1000, help="jobs in the dispatch burst")
    bench.add_argument(
        "--only",
        choices=["job", "dispatch", "wait", "cold", "stats"],
        help="one half of the benchmark (job, dispatch), or one of its figures (wait: Stable Audio 3's"
        " wait, polled or checked back; cold starts; job_stats)",
    )
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
