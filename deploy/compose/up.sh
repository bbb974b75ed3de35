#!/usr/bin/env bash
# One command: build the images (no registry needed), start an S3-compatible store, a
# coordinator and WORKERS workers as containers on a private network, train the quick-start
# model with its run stored in s3://stackwise/compose, and verify the checkpoints.
#
#   bash deploy/compose/up.sh
#
# Environment: WORKERS (2), STEPS (400), PROJECT (stackwise), METRICS_PORT (9090), and the
# settings in docker-compose.yml. The store's volume stays when the job ends; remove it with
#   STACKWISE_TOKEN=x docker-compose -f deploy/compose/docker-compose.yml -p stackwise down -v
set -euo pipefail
cd "$(dirname "$0")/../.."
export WORKERS=${WORKERS:-2}
project=${PROJECT:-stackwise}
source deploy/compose/lib.sh

bash deploy/docker/build-cpu.sh --s3
compose up -d --scale worker="$WORKERS"
echo "job up: $WORKERS worker(s); metrics and dashboard on http://127.0.0.1:$METRICS_PORT/"
echo "  follow it: docker-compose -f deploy/compose/docker-compose.yml -p $project logs -f coordinator"
wait_finished "${TIMEOUT_S:-7200}" || { compose logs --tail 40 coordinator >&2; exit 1; }
compose logs --no-color coordinator | grep -E 'done: run' || true
verify_run
compose stop >/dev/null 2>&1
echo "checkpoints are in s3://stackwise/compose/runs/quickstart (volume ${project}_s3)"
