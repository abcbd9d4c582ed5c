"""The server's commands of `distill`, added to the client's command line (distill_client.cli), which
this package's entry point `distill.cli` loads: `up`, `worker` (serve), `train` (local), `migrate`,
`users create|token|tokens|revoke|webhook`, `keys rotate|list|retire` (admin). They act on this machine's
settings; `train` runs a spec here without any service. Importing a module registers its commands.
"""

from app.cli import admin, local, serve  # noqa: F401 (they register their commands)
from distill_client.cli import EXIT_CODES, cli, main

__all__ = ["EXIT_CODES", "cli", "main"]
