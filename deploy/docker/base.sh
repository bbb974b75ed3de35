#!/usr/bin/env bash
# The base image, made with no registry: a minimal Debian bookworm root filesystem from
# Debian's own packages (debootstrap), trimmed and imported into Docker.
#
#   bash deploy/docker/base.sh            # builds stackwise-base:bookworm unless it exists
#   FORCE=1 bash deploy/docker/base.sh    # builds it again
#
# Needs root and debootstrap (apt-get install debootstrap). The mirror is the one apt uses
# here (DEBIAN_MIRROR overrides it).
set -euo pipefail
image=${BASE_IMAGE:-stackwise-base:bookworm}
if [ -z "${FORCE:-}" ] && docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)}
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d /tmp/stackwise-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm from $mirror"
# ca-certificates: for S3 over https. Nothing else beyond minbase: the binary is static
# but for glibc.
debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$mirror" > "$root.log" 2>&1 \
  || { tail -n 30 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# Trim what a container never reads: docs, man pages, locales, apt's lists and caches.
rm -rf "$root"/usr/share/{doc,man,info,locale,lintian,bash-completion} \
  "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/var/log/* "$root"/tmp/*
tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "base image $image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.1f MB", $1/1e6}')"
