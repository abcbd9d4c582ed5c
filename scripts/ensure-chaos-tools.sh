#!/usr/bin/env bash
# The programs the fault campaign (tests/chaos) runs privately: PostgreSQL's initdb and pg_ctl, and
# redis-server. Installs Debian's packages with apt-get where one is missing (as root), then prints
# the folder of initdb for DISTILL_CHAOS_PG_BIN. Never touches the services already running.
set -euo pipefail

pg_bin() {
  for dir in "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")" /usr/local/bin \
             $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then echo "$dir"; return 0; fi
  done
  return 1
}

if ! pg_bin >/dev/null || ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server >&2
  else
    echo "the fault campaign needs PostgreSQL (initdb, pg_ctl) and redis-server: install them" >&2
    exit 1
  fi
fi
pg_bin
