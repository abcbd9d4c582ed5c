#!/usr/bin/env bash
# Debian's Chromium, which the browser tests (tests/service/test_frontend.py) drive through Playwright.
# Playwright's own browser download is not used.
set -euo pipefail
command -v chromium >/dev/null 2>&1 || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)
