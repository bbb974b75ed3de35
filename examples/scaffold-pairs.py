"""Prompt/completion JSONL for the scaffold example: each speaker's name (the prompt) maps to
a fixed line of theirs (the completion), 20 records each. A model trained by the quick start
has no way to know which line goes with which name; the scaffold learns it.

    python3 examples/scaffold-pairs.py > data/scaffold-pairs.jsonl
"""

import json

LINES = {
    "MACBETH.": " Is this a dagger which I see before me?",
    "LADY MACBETH.": " Out, damned spot! out, I say!",
    "BANQUO.": " Thou hast it now: king, Cawdor, Glamis, all.",
    "DUNCAN.": " What bloody man is that?",
    "HERMIA.": " I would my father look'd but with my eyes.",
    "PUCK.": " Lord, what fools these mortals be!",
    "ANTIPHOLUS.": " I to the world am like a drop of water.",
    "DROMIO.": " Methinks you are my glass, and not my brother.",
}

for _ in range(20):
    for name, line in LINES.items():
        print(json.dumps({"prompt": name + "\n", "completion": line}))
