#!/usr/bin/env bash
# Build the CPU image stackwise:cpu (and, with --s3, the store image stackwise-s3:local for
# deploy/compose) from the debootstrapped base, with no network during `docker build`.
#
#   bash deploy/docker/build-cpu.sh [--s3]
#
# STACKWISE_BIN: a stackwise binary to use (default: cargo build --release here).
# S3S_FS_BIN: the s3s-fs binary (default: target/s3s/bin/s3s-fs, installed on first use).
set -euo pipefail
cd "$(dirname "$0")/../.."
with_s3=0
[ "${1:-}" = --s3 ] && with_s3=1
image=${STACKWISE_IMAGE:-stackwise:cpu}

bash deploy/docker/base.sh

bin=${STACKWISE_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet -p stackwise
  bin=target/release/stackwise
fi
ctx=$(mktemp -d /tmp/stackwise-image.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
# Symbols are a third of the binary; a container has no use for them.
strip -o "$ctx/stackwise" "$bin"
cp deploy/docker/Dockerfile.cpu "$ctx/Dockerfile"
docker build --quiet --network none -t "$image" "$ctx" >/dev/null
size=$(docker image inspect -f '{{.Size}}' "$image")
echo "image $image: $(awk -v s="$size" 'BEGIN{printf "%.1f MB", s/1e6}') (binary $(stat -c %s "$ctx/stackwise" | awk '{printf "%.1f MB", $1/1e6}'))"

if [ "$with_s3" = 1 ]; then
  s3=${S3S_FS_BIN:-target/s3s/bin/s3s-fs}
  if [ ! -x "$s3" ]; then
    cargo install s3s-fs@0.14.1 --features binary --locked --root target/s3s
  fi
  rm -f "$ctx"/*
  strip -o "$ctx/s3s-fs" "$s3"
  cp deploy/docker/Dockerfile.s3 "$ctx/Dockerfile"
  docker build --quiet --network none -t stackwise-s3:local "$ctx" >/dev/null
  echo "image stackwise-s3:local: $(docker image inspect -f '{{.Size}}' stackwise-s3:local | awk '{printf "%.1f MB", $1/1e6}')"
fi
