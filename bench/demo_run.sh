#!/usr/bin/env bash
# Time the demo as a new user meets it, and check its targets: it finishes within 15 minutes and
# the student ends closer to the teacher (reverse KL on held-out prompts) than it started.
# The cache starts empty, so the run includes converting the teacher from its GGUF file, the
# teacher writing the demo references, and DeepSpeed compiling its CPU comm op.
#   bench/demo_run.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/demo-timing}
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
rm -rf "$out"; mkdir -p "$(dirname "$out")"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB"
start=$(date +%s)
DISTILL_CACHE_DIR=$cache .venv/bin/distill train examples/smollm2-minillm.yaml --output "$out" 2> "$out.log"
seconds=$(( $(date +%s) - start ))
echo "wall time: ${seconds} s (empty cache)"
.venv/bin/python - "$out/events.jsonl" "$seconds" <<'PY'
import json, sys
events = [json.loads(line) for line in open(sys.argv[1])]
start = events[0]["time"]
for e in events:
    if e["type"] in ("eval", "checkpoint") or (e["type"] == "state" and e["data"].get("state") == "running"):
        print(f"{e['time'] - start:7.1f} s  {e['message']}")
evals = {e["data"]["label"]: e["data"]["scores"] for e in events if e["type"] == "eval"}
checks = {
    "finishes within 15 minutes": int(sys.argv[2]) <= 900,
    "final reverse KL below the initial student's": evals["final"]["reverse_kl"] < evals["initial"]["reverse_kl"],
}
for name, ok in checks.items():
    print(f"{'PASS' if ok else 'FAIL'}: {name}")
sys.exit(0 if all(checks.values()) else 1)
PY
