#!/usr/bin/env bash
# deploy/compose tested for real, as `.ci/run` runs it: containers on a private network, the
# run in a real S3-compatible store, and failures made with Docker's own tools.
#
#   bash deploy/compose/test.sh        # SKIP_BUILD=1: use the images already built
#
# 1. A clean 2-worker job completes and its checkpoints verify.
# 2. The same job, disturbed, ends bitwise equal to it:
#    a. `docker kill` of worker 1 (a kill is a manual stop in Docker, so no restart policy
#       acts on it: the test starts it again, as an operator would);
#    b. SIGKILL of worker 2's process from the host (a crash: the `on-failure` restart policy
#       brings it back by itself);
#    c. `docker network disconnect` of worker 1: the coordinator must drop it within its lease;
#       the job waits for 2 workers again and recovers when it is reconnected;
#    d. `docker restart` of the coordinator: it checkpoints and stops, the workers exit 75
#       and are restarted, the coordinator resumes from the newest checkpoint in S3.
#    Workers reach each other's ring ports at their containers' addresses, not loopback.
set -euo pipefail
cd "$(dirname "$0")/../.."
export WORKERS=2 STEPS=${STEPS:-60} CHECKPOINT_EVERY=10 EVAL_EVERY=20 D_MODEL=64 N_LAYERS=2
export LEASE_MS=${LEASE_MS:-4000}
source deploy/compose/lib.sh

[ -n "${SKIP_BUILD:-}" ] || bash deploy/docker/build-cpu.sh --s3
cleanup() {
  for p in swclean swchaos; do project=$p compose down -v --remove-orphans >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
cleanup

fail() {
  echo "FAIL: $*" >&2
  compose logs --no-color --tail 60 >&2 || true
  exit 1
}

# Wait up to $1 s for the command after it to succeed.
until_ok() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}
alive_is() { awk -v a="$(metric workers_alive)" -v n="$1" 'BEGIN { exit !(a != "" && a + 0 == n) }'; }

echo "== compose 1/2: clean job, $WORKERS workers, $STEPS steps"
project=swclean
t=$(date +%s)
compose up -d --scale worker=2 >/dev/null 2>&1 || fail "compose up"
wait_finished 600 || fail "the clean job did not finish"
verify_run || fail "ckpt verify"
clean=$(checkpoint_sha "$STEPS")
echo "clean job finished in $(( $(date +%s) - t )) s; step $STEPS weights sha256 $clean"
logs=$(compose logs --no-color worker)
grep -o 'ring=[0-9.]*:[0-9]*' <<<"$logs" | sort -u | sed 's/^/  worker /'
if grep -q 'ring=127\.' <<<"$logs"; then fail "a worker advertised loopback"; fi
compose down -v >/dev/null 2>&1

echo "== compose 2/2: the same job with a killed worker, a crashed worker, a cut-off worker and a restarted coordinator"
project=swchaos
t=$(date +%s)
compose up -d --scale worker=2 >/dev/null 2>&1 || fail "compose up"
w1=$(container worker 1) w2=$(container worker 2) co=$(container coordinator)
net="${project}_job"

wait_step 8 2 300 || fail "the job did not reach step 8"
echo "a. step $(metric step): docker kill $w1"
docker kill "$w1" >/dev/null
until_ok 30 alive_is 1 || fail "the killed worker was not dropped"
docker start "$w1" >/dev/null
wait_step 18 2 120 || fail "the job did not recover from docker kill"
echo "   recovered: step $(metric step) with 2 ranks"

echo "b. step $(metric step): SIGKILL of $w2's process (a crash)"
kill -9 "$(docker inspect -f '{{.State.Pid}}' "$w2")"
until_ok 30 alive_is 1 || fail "the crashed worker was not dropped"
wait_step 28 2 120 || fail "the job did not recover from the crash"
restarts=$(docker inspect -f '{{.RestartCount}}' "$w2")
[ "$restarts" -ge 1 ] || fail "the restart policy did not restart $w2"
echo "   recovered: step $(metric step) with 2 ranks; the restart policy restarted $w2 ($restarts)"

echo "c. step $(metric step): docker network disconnect $net $w1 (lease ${LEASE_MS} ms)"
t0=$(now)
docker network disconnect "$net" "$w1"
until_ok 60 alive_is 1 || fail "the cut-off worker was never dropped"
dropped=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
awk -v d="$dropped" -v l="$LEASE_MS" 'BEGIN { exit !(d <= l / 1000 + 2) }' \
  || fail "the cut-off worker was dropped after ${dropped} s, not within its lease"
echo "   dropped after ${dropped} s"
docker network connect "$net" "$w1"
wait_step 38 2 180 || fail "the job did not recover after the worker was reconnected"
echo "   reconnected and recovered: step $(metric step) with 2 ranks"

echo "d. step $(metric step): docker restart $co"
docker restart -t 60 "$co" >/dev/null
wait_finished 600 || fail "the job did not finish after the coordinator restart"
logs=$(compose logs --no-color)
grep -q 'SIGTERM; checkpointing' <<<"$logs" || fail "the coordinator did not checkpoint on SIGTERM"
grep -q 'exiting 75' <<<"$logs" || fail "no worker exited 75 for the resumed job"
grep -q 'from step [1-9]' <<<"$logs" || fail "no generation resumed from a checkpoint"
verify_run || fail "ckpt verify after the disturbed run"
chaos=$(checkpoint_sha "$STEPS")
echo "disturbed job finished in $(( $(date +%s) - t )) s; step $STEPS weights sha256 $chaos"
[ "$clean" = "$chaos" ] || fail "the disturbed job's final weights differ from the clean job's"
echo "compose: the disturbed job ends bitwise equal to the clean one"
