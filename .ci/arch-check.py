#!/usr/bin/env python3
"""Architecture checks (issue 10), run by .ci/run:
- no source file over 800 lines (tests, fixtures and third_party/ aside);
- the control-plane crate (stackwise-coordinator) has no candle in its dependency tree;
- no import cycle between the modules of a crate, and no import from the model code
  (worker/src/models, worker/src/adapters) into training (worker/src/train).
Prints what it checked; exits 1 on a violation."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRATES = {"common": "common/src", "worker": "worker/src", "coordinator": "coordinator/src",
          "cli": "cli/src", "proto": "proto/src"}
bad = []

files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.rs"], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout.split()
sources = [f for f in files if not f.startswith("third_party/") and "/tests/" not in f
           and not f.startswith("tests/") and not f.endswith("/tests.rs") and not f.endswith("/testing.rs")]
longest = max(sources, key=lambda f: sum(1 for _ in open(os.path.join(ROOT, f))))
for f in sources:
    n = sum(1 for _ in open(os.path.join(ROOT, f)))
    if n > 800:
        bad.append(f"{f}: {n} lines (over 800)")
print(f"file sizes: {len(sources)} source files, the longest {longest} "
      f"({sum(1 for _ in open(os.path.join(ROOT, longest)))} lines)")

tree = subprocess.run(["cargo", "tree", "-p", "stackwise-coordinator", "-e", "normal", "--prefix", "none"],
                      cwd=ROOT, capture_output=True, text=True, check=True).stdout
candle = sorted({l.split()[0] for l in tree.splitlines() if l.startswith("candle")})
if candle:
    bad.append(f"stackwise-coordinator depends on {candle}")
print(f"control plane: stackwise-coordinator's tree has {len(set(tree.splitlines()))} crates, "
      f"candle among them: {'yes' if candle else 'no'}")


def module_of(crate_src, path):
    """`a::b` for crate_src/a/b.rs or crate_src/a/b/mod.rs (the crate root is '')."""
    rel = os.path.relpath(path, crate_src)[:-3]
    parts = rel.split(os.sep)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return "::".join(parts)


def top(module):
    return module.split("::")[0] if module else ""


edges_checked = 0
for crate, src in CRATES.items():
    graph = {}
    for f in sources:
        if not f.startswith(src + "/"):
            continue
        me = module_of(os.path.join(ROOT, src), os.path.join(ROOT, f))
        text = open(os.path.join(ROOT, f)).read()
        # Imports outside #[cfg(test)] modules.
        text = text.split("#[cfg(test)]")[0]
        deps = set()
        for m in re.finditer(r"\b(crate|super)::([a-z_][a-z0-9_]*)(?:::([a-z_][a-z0-9_]*))?", text):
            kind, first, second = m.groups()
            if kind == "crate":
                target = first
            else:
                parent = me.split("::")[:-1] if not f.endswith("mod.rs") else me.split("::")
                target = "::".join(parent[:1] + [first]) if parent else first
            deps.add(target)
        graph[me] = deps
    # Cycles between the top-level modules of the crate (a module may use its own children).
    tops = {}
    for me, deps in graph.items():
        for d in deps:
            a, b = top(me), top(d)
            if a and b and a != b:
                tops.setdefault(a, set()).add(b)
                edges_checked += 1

    def reach(a, b, seen=()):
        return b in tops.get(a, ()) or any(reach(c, b, seen + (a,)) for c in tops.get(a, ()) if c not in seen)

    for a in sorted(tops):
        for b in sorted(tops[a]):
            if reach(b, a):
                bad.append(f"{crate}: import cycle between modules {a} and {b}")
    # Sibling files inside a module must not import each other both ways.
    for me, deps in graph.items():
        for d in deps:
            if d != me and me in graph.get(d, ()) and me < d and top(me) == top(d):
                bad.append(f"{crate}: {me} and {d} import each other")
    if crate == "worker":
        for me, deps in graph.items():
            if top(me) in ("models", "adapters") and any(top(d) == "train" for d in deps):
                bad.append(f"worker: {me} (model code) imports training")
print(f"imports: {edges_checked} cross-module imports checked for cycles and model -> train arrows")

for b in bad:
    print("FAIL:", b)
sys.exit(1 if bad else 0)
