#!/usr/bin/env bash
# Time the demo as a new user meets it, and check its targets: it finishes within 15 minutes and
# the student ends closer to the teacher than it started (reverse KL down, Rouge-L up on held-out
# prompts). The cache starts empty, so the run includes converting the teacher from its GGUF file,
# the teacher writing the demo references, and DeepSpeed compiling its CPU comm op.
# It prints the machine, the phases and the scores as the markdown that docs/performance.md shows.
#   bench/demo_run.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/demo-timing}
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
rm -rf "$out"; mkdir -p "$(dirname "$out")"
flags=$(grep -m1 '^flags' /proc/cpuinfo)
case "$flags" in *avx512_bf16*|*amx_bf16*) bf16="native bf16" ;; *) bf16="no native bf16" ;; esac
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores ($bf16), $(free -g | awk '/Mem/{print $2}') GiB; $(date -u +%F)"
start=$(date +%s)
DISTILL_CACHE_DIR=$cache .venv/bin/distill train examples/smollm2-minillm.yaml --output "$out" 2> "$out.log"
seconds=$(( $(date +%s) - start ))
.venv/bin/python - "$out/events.jsonl" "$seconds" <<'PY'
import json, sys
events = [json.loads(line) for line in open(sys.argv[1])]
total = int(sys.argv[2])
start = events[0]["time"]
def at(pred):
    return next(e["time"] - start for e in events if pred(e))
metrics = [e for e in events if e["type"] == "metrics"]
first_main = next(e for e in metrics if not e["data"]["stage"].startswith("recovery"))
recovery_steps = sum(1 for e in metrics if e["data"]["stage"].startswith("recovery"))
main_steps = len(metrics) - recovery_steps
training = at(lambda e: e["type"] == "state" and e["data"].get("state") == "running")
# The first MiniLLM step ends with its metrics; it began its sections' total earlier.
main = first_main["time"] - start - sum(v for k, v in first_main["data"]["values"].items() if k.startswith("time_"))
print("\n| phase | wall time |\n|---|---|")
print(f"| set-up (compile, conversion, references, teacher and initial evals) | {training:.0f} s |")
print(f"| {recovery_steps} KD recovery steps, with the eval after them | {main - training:.0f} s |")
print(f"| {main_steps} MiniLLM steps, with the final eval and checkpoint | {total - main:.0f} s |")
print(f"| **total** (empty cache) | **{total} s ({total // 60} min {total % 60} s)** |")
evals = {e["data"]["label"]: e["data"]["scores"] for e in events if e["type"] == "eval" and e["data"].get("set") == "test"}
names = ["rouge_l", "response_length", "reverse_kl", "forward_kl"]
print("\n| model | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
for label, scores in evals.items():
    print(f"| {label} | " + " | ".join(f"{scores[n]:.2f}" if n in scores else "–" for n in names) + " |")
checks = {
    "finishes within 15 minutes": total <= 900,
    "final reverse KL below the initial student's": evals["final"]["reverse_kl"] < evals["initial"]["reverse_kl"],
    "final Rouge-L above the initial student's": evals["final"]["rouge_l"] > evals["initial"]["rouge_l"],
}
print()
for name, ok in checks.items():
    print(f"{'PASS' if ok else 'FAIL'}: {name}")
sys.exit(0 if all(checks.values()) else 1)
PY
