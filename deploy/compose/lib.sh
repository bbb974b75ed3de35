# Shared by up.sh and test.sh: drive one compose project (its own network and volumes).
# Set `project` before calling; METRICS_PORT is where its coordinator's /metrics is published.
compose_file="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/docker-compose.yml"
export METRICS_PORT=${METRICS_PORT:-9090}
export STACKWISE_TOKEN=${STACKWISE_TOKEN:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}

compose() { docker-compose --ansi never -f "$compose_file" -p "$project" "$@"; }

# The container of SERVICE (and replica N, default 1), as compose 1.x names it.
container() { echo "${project}_$1_${2:-1}"; }

# A gauge or counter of the coordinator's /metrics ("" while it does not answer).
metric() {
  curl -sf --max-time 2 "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null \
    | awk -v m="stackwise_$1" '$1 == m || $1 == m "_total" { print $2 + 0; exit }'
}

now() { date +%s.%N; }

# Wait until the job's step is at least $1 with $2 ranks training (timeout $3 s).
wait_step() {
  local want=$1 ranks=$2 deadline=$(( $(date +%s) + ${3:-300} )) s r
  while :; do
    s=$(metric step); r=$(metric workers_in_generation)
    if [ -n "$s" ] && [ -n "$r" ] && awk -v s="$s" -v w="$want" -v r="$r" -v n="$ranks" \
        'BEGIN { exit !(s + 0 >= w && r + 0 == n) }'; then
      return 0
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "timed out waiting for step $want with $ranks ranks (step '${s}', ranks '${r}')" >&2
      return 1
    fi
    sleep 0.2
  done
}

# Wait until the coordinator container has exited 0 (the job finished; timeout $1 s).
wait_finished() {
  local c deadline=$(( $(date +%s) + ${1:-600} )) st
  c=$(container coordinator)
  while :; do
    st=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$c" 2>/dev/null || echo gone)
    [ "$st" = "exited 0" ] && return 0
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "timed out waiting for the job to finish (coordinator: $st)" >&2
      return 1
    fi
    sleep 1
  done
}

# sha256 of a file of the final checkpoint, read from the store's volume.
checkpoint_sha() {
  local step=$1 file=${2:-model.safetensors}
  docker run --rm --network none -v "${project}_s3:/s3:ro" "${BASE_IMAGE:-stackwise-base:bookworm}" \
    sha256sum "/s3/stackwise/compose/runs/quickstart/checkpoints/step-$(printf %08d "$step")/$file" \
    | cut -d' ' -f1
}

# `stackwise ckpt verify` of the run in S3, from a container on the job's network.
verify_run() {
  compose run --rm --no-deps -T coordinator ckpt verify s3://stackwise/compose/runs/quickstart
}
