#!/usr/bin/env bash
# The client package (client/) built and installed alone, in a virtualenv of a Python other than the
# server's: the oldest it supports where there is one (pyenv's 3.9 on the project's machines), else a
# newer one. tests/service/test_client.py runs the client there. Prints the venv's bin folder, or nothing
# where this machine has no other Python.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python=""
for version in 3.9 3.13 3.10 3.12; do
  for candidate in "$HOME"/.pyenv/versions/"$version".*/bin/python"$version" "$(command -v python"$version" || true)"; do
    if [ -x "$candidate" ] && "$candidate" -c 'import venv' 2>/dev/null; then python="$candidate"; break 2; fi
  done
done
[ -n "$python" ] || exit 0
venv="$root/.cache/client-py$version"
# Installed again whenever the client's files change: the test runs what the checkout builds.
stamp="$(cd "$root/client" && find . -name '*.py' -o -name '*.toml' -o -name '*.md' | sort | xargs sha256sum | sha256sum | cut -c1-16)"
if [ ! -f "$venv/.installed-$stamp" ]; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q "$root/client" >&2
  rm -rf "$root/client/build"
  touch "$venv/.installed-$stamp"
fi
echo "$venv/bin"
