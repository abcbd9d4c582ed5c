#!/usr/bin/env bash
# What the node-group test (tests/service/test_node_group.py) runs: DeepSpeed's multi-node launcher
# needs pdsh and an ssh client, and the test starts its own ssh server for two simulated hosts.
# Debian's packages, installed with apt-get where one is missing. The ssh server is not started here.
set -euo pipefail
if ! command -v pdsh >/dev/null || ! command -v ssh >/dev/null || [ ! -x /usr/sbin/sshd ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pdsh openssh-client openssh-server
fi
