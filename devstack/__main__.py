"""`python -m devstack COMMAND`: demo, dev, bench, the local world's commands (scripts/run.py routes
them here). They start the embedded stack, which never deploys; sona's own commands are
`python -m sona`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sona.catalog import MODELS
from sona.config import ConfigError


def _strength(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be 0 to 1")
    return value


def _demo(args: argparse.Namespace) -> int:
    from devstack.demo import PluginRequest, demo

    # The plug-in's flow unless the earlier worker's is asked for (audio-to-audio is only there).
    earlier = args.earlier_worker or args.input is not None
    plugin = None if earlier else PluginRequest(args.mode or "designer", args.bpm, args.key)
    try:
        return demo(
            args.prompt,
            args.duration,
            args.quality,
            args.input,
            args.strength,
            plugin,
            args.model,
            as_json=args.json,
            database_url=args.database_url,
        )
    except ConfigError as exc:  # raised before the stack starts anything
        print(exc, file=sys.stderr)
        return 1


def _dev(args: argparse.Namespace) -> int:
    from devstack.demo import dev

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
        return dev(args.json, ports, database_url=args.database_url, functions_url=args.functions_url)
    except ConfigError as exc:  # raised before the stack starts anything
        print(exc, file=sys.stderr)
        return 1


def _bench(args: argparse.Namespace) -> int:
    from devstack.bench.bench import main as bench

    return bench(args.runs, Path(args.out), args.burst_jobs, args.only)


def _seconds(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 380:
        raise argparse.ArgumentTypeError(f"must be 1 to 380 seconds, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
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
        # It names STABLE_AUDIO_MODEL too, which serves audio-to-audio: the models that take an input.
        choices=[name for name, model in MODELS.items() if model.takes_input],
        help="the model for every mode (else DESIGNER_MODEL, PRODUCER_MODEL, CREATOR_MODEL and"
        " STABLE_AUDIO_MODEL from the environment; stable-audio-2.5 by default)",
    )
    demo.add_argument("--quality", choices=["low", "medium", "high", "draft", "standard"], default="medium")
    demo.add_argument(
        "--mode",
        choices=["designer", "producer", "creator"],
        help="the plug-in's mode (default designer): the job is charged and inserted as its generate"
        " function does (service role, queued)",
    )
    demo.add_argument(
        "--earlier-worker",
        action="store_true",
        help="the earlier worker's flow instead: mode default, status pending, the row and its URLs",
    )
    demo.add_argument("--json", action="store_true", help="print the whole finished row as JSON")
    demo.add_argument(
        "--database-url",
        help="run on this existing PostgreSQL (on a copy of the plug-in's database, tokens are charged"
        " as generate charges them)",
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
    dev.add_argument(
        "--functions-url",
        help="forward /functions/v1/* to this server (your own Edge Functions, e.g. `supabase functions"
        " serve`), so a client calls generate at the stack's one base URL; the stack serves none itself",
    )
    dev.set_defaults(run=_dev)
    bench = commands.add_parser(
        "bench", help="cold start, job overhead, memory, throughput, reclaim, dispatch modes"
    )
    bench.add_argument("--runs", type=int, default=5, help="runs per figure (median, min, max)")
    bench.add_argument("--out", default="bench-results.json", help="where the JSON goes")
    bench.add_argument("--burst-jobs", type=int, default=1000, help="jobs in the dispatch burst")
    bench.add_argument(
        "--only",
        choices=["job", "path", "throughput", "dispatch", "wait", "cold", "stats", "triggers", "reclaim"],
        help="one half of the benchmark (job, dispatch), or one of its figures (path: one job insert to"
        " completed through the stack, with its per-step breakdown; throughput; wait: Stable Audio 3's"
        " wait, polled or checked back; cold starts; reclaim of 10,000 expired leases, with its parts;"
        " job_stats; triggers: what the triggers on jobs cost an insert and a claim)",
    )
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
