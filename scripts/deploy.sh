#!/usr/bin/env bash
# Deploy process_job and reclaim_jobs (Cloud Functions 2nd gen) and the Cloud Scheduler job, with
# plain gcloud. Settings come from the environment and ./.env, under the function's own names plus
# GOOGLE_CLOUD_PROJECT and REGION. The commands come from `python -m sona deploy-plan`, the same
# source Cloud Build uses, so the two paths cannot drift.
#
#   scripts/deploy.sh --dry-run    # print the exact commands
#   scripts/deploy.sh              # run them (twice is fine: everything updates in place)
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=false
case "${1:-}" in
  --dry-run) dry_run=true ;;
  "") ;;
  *) echo "usage: scripts/deploy.sh [--dry-run]" >&2; exit 2 ;;
esac

if [[ -f .env ]]; then
  set -a; . ./.env; set +a
fi

if [[ -n "${PYTHON:-}" ]]; then
  plan=("$PYTHON" -m sona deploy-plan)
elif [[ -x .venv/bin/python ]]; then
  plan=(.venv/bin/python -m sona deploy-plan)
else
  plan=(python3 scripts/run.py deploy-plan)
fi

commands="$("${plan[@]}")"
if $dry_run; then
  printf '%s\n' "$commands"
else
  bash -c "$commands"
fi
