#!/usr/bin/env bash
# Time the demo as a new user meets it: an empty cache, so the teacher is converted from its GGUF
# file, the teacher writes the demo references, and DeepSpeed compiles its CPU comm op.
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
echo "wall time: $(( $(date +%s) - start )) s (empty cache)"
