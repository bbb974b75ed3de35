#!/usr/bin/env python3
"""Instruction data for the mini-GPT workflow (README): from plays, one JSONL record a pair of
consecutive lines, `### Instruction:` the first, `### Response:` the second. `data prepare`
puts the loss only on what follows `### Response:`.

    python3 examples/make-sft.py PLAY.txt [PLAY.txt ...] > sft.jsonl
"""
import json
import sys

for path in sys.argv[1:]:
    lines = [l.strip() for l in open(path, encoding="utf-8") if len(l.strip()) > 20]
    for a, b in zip(lines, lines[1:]):
        print(json.dumps({"text": f"### Instruction: Continue the verse.\n{a}\n### Response: {b}"}))
