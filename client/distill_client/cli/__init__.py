"""`distill`: the command line for people and CI.

The client commands (`submit`, `validate`, `resume`, `jobs`, `status`, `logs`, `cancel`, `delete`,
`download`, `checkpoints`, `evals`, `datasets`, `delete-dataset`, `webhook`) talk to the API at --url /
DISTILL_URL with --token / DISTILL_TOKEN through distill_client.api. Where the server package is
installed, its commands (`up`, `worker`, `train`, `users`, `keys`, ...) are added (cli.plugins).

Every command that prints takes --json: one JSON document on stdout. Every error is one line on stderr
(with --json, a JSON document) and an exit code of its kind (ExitCode), from one handler (core._Commands).
"""

from . import commands  # noqa: F401 (registers the client commands)
from .core import EXIT_CODES, ExitCode, cli
from .plugins import load_commands

__all__ = ["EXIT_CODES", "ExitCode", "cli", "main"]


def main() -> None:
    load_commands()
    cli()
