#!/usr/bin/env bash
# Deploy the Cloud Tasks queue, run_job, process_job, reclaim_jobs and the Cloud Scheduler job
# (Cloud Functions 2nd gen), with plain gcloud. Settings come from deploy.env (DEPLOY_SETTINGS names
# another file), the one file Cloud Build reads too; .env is the local stack's and is not deployed
# (the plan names any function setting there that deploy.env does not carry). The commands come
# from `python -m sona deploy-plan`, the same source Cloud Build uses, so the two paths cannot drift.
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
