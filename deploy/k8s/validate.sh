#!/usr/bin/env bash
# Render every variant with kustomize (kubectl kustomize) and validate it offline with
# kubernetes-validate --strict (unknown fields are errors). The JobSet is a custom resource:
# its Job templates are validated as batch/v1 Jobs, and its own fields are checked here.
#
#   bash deploy/k8s/validate.sh       # needs kubectl and: pip install kubernetes-validate
set -euo pipefail
cd "$(dirname "$0")"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for v in overlays/cpu overlays/gpu jobset; do
  kubectl kustomize "$v" > "$out/${v//\//-}.yaml"
done
python3 - "$out" <<'PY'
import sys, yaml, pathlib
out = pathlib.Path(sys.argv[1])
docs = list(yaml.safe_load_all((out / "jobset.yaml").read_text()))
core, jobsets = [], []
for d in docs:
    (jobsets if d["kind"] == "JobSet" else core).append(d)
assert len(jobsets) == 1, "one JobSet"
js = jobsets[0]
assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2", js["apiVersion"]
allowed = {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy",
           "suspend", "coordinator", "managedBy", "ttlSecondsAfterFinished"}
unknown = set(js["spec"]) - allowed
assert not unknown, f"unknown JobSet spec fields: {unknown}"
names = [r["name"] for r in js["spec"]["replicatedJobs"]]
for t in js["spec"]["successPolicy"].get("targetReplicatedJobs", []):
    assert t in names, f"successPolicy names {t}, not a replicatedJob"
for r in js["spec"]["replicatedJobs"]:
    assert set(r) <= {"name", "replicas", "template", "dependsOn", "groupName"}, r.keys()
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": f"{js['metadata']['name']}-{r['name']}"}, **r["template"]}
    core.append(job)
(out / "jobset.yaml").write_text(yaml.safe_dump_all(core))
print(f"jobset: {len(names)} replicated jobs ({', '.join(names)}) -> validated as batch/v1 Jobs")
PY
kubernetes-validate --strict --quiet "$out"/*.yaml
# The check must be able to fail: an unknown field in a pod spec is rejected.
python3 - "$out/overlays-cpu.yaml" "$out/broken.yml" <<'PY'
import sys, yaml
docs = list(yaml.safe_load_all(open(sys.argv[1])))
job = next(d for d in docs if d["kind"] == "Job")
job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
open(sys.argv[2], "w").write(yaml.safe_dump(job))
PY
if kubernetes-validate --strict --quiet "$out/broken.yml" >/dev/null 2>&1; then
  echo "kubernetes-validate --strict accepted an unknown field" >&2
  exit 1
fi
echo "k8s: overlays/cpu, overlays/gpu and jobset pass kubernetes-validate --strict"
