"""What other installed packages add to `distill`, through entry points:

- `distill.cli`: modules whose import adds commands to the app (the server package's `up`, `worker`,
  `train`, `users`, ...), loaded before the command line is read;
- `distill.local_server`: a function answering (URL, token or None) for a server on this machine,
  where commands go without --url or DISTILL_URL, or None where there is none.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Optional


def _group(name: str) -> list:
    found = entry_points()
    return list(found.select(group=name) if hasattr(found, "select") else found.get(name, ()))  # Python 3.9: a dict


def load_commands() -> None:
    for plugin in _group("distill.cli"):
        plugin.load()


def local_server() -> Optional[tuple[str, Optional[str]]]:
    for plugin in _group("distill.local_server"):
        return plugin.load()()
    return None
