"""`distill`: the command line for people and CI.

Server commands (`up`, `worker`, `migrate`, `users create|token|tokens|revoke`, `keys rotate|list|retire`)
act on this machine's settings; client commands (`submit`, `validate`, `jobs`, `status`, `logs`, `cancel`,
`download`, `checkpoints`, `evals`, `datasets`) talk to the API at --url / DISTILL_URL with --token /
DISTILL_TOKEN through app/client.py. `train` runs a spec here without any service.

Every command that prints takes --json: one JSON document on stdout. Every error is one line on stderr
(with --json, a JSON document) and an exit code of its kind (ExitCode), from one handler (core._Commands).
One module per audience: core (what all share), admin, local, serve, remote; importing them registers
their commands, in the order `distill --help` lists them.
"""

from app.cli import admin, local, remote, serve  # noqa: F401 (they register their commands)
from app.cli.core import EXIT_CODES, cli, main

__all__ = ["EXIT_CODES", "cli", "main"]
