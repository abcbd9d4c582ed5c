#!/usr/bin/env bash
# Start the PostgreSQL and Redis that the tests use (127.0.0.1:5432, trust auth; 127.0.0.1:6379)
# where they are installed but not running. Leaves running services alone.
set -euo pipefail

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  else
    echo "PostgreSQL is not running on 127.0.0.1:5432 and no local cluster was found to start." >&2
    echo "Install it (e.g. apt-get install postgresql) with trust auth for user postgres on 127.0.0.1." >&2
    exit 1
  fi
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  if command -v redis-server >/dev/null; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp
  else
    echo "Redis is not running on 127.0.0.1:6379 and redis-server is not installed (apt-get install redis-server)." >&2
    exit 1
  fi
  for _ in $(seq 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
