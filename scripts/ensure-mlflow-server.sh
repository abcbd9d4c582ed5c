#!/usr/bin/env bash
# The MLflow tracking server that tests/test_trackers.py starts, in a virtualenv of its own. The full
# `mlflow` package (the server) brings SciPy and scikit-learn, which NLTK (under rouge-score) then
# imports in every training process: 1.3 s more for each one the tests start. The project's venv keeps
# mlflow-skinny, the client the engine uses. Prints the server's `mlflow` command.
set -euo pipefail
MLFLOW=mlflow==3.18.0  # the server of the mlflow-skinny release pinned in pyproject.toml
venv="$(cd "$(dirname "$0")/.." && pwd)/.cache/mlflow-server"
if [ ! -f "$venv/.installed-$MLFLOW" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$MLFLOW" >&2
  touch "$venv/.installed-$MLFLOW"
fi
echo "$venv/bin/mlflow"
