"""Model references, checked without loading anything: the API checks specs with this module, and
never imports torch or transformers (`models` builds and loads what a reference names, on workers).

A reference is `builtin:NAME`, a local Hugging Face model directory, or a hub id where a hub is
reachable: `org/name`, or `hub:org/name`, which is never taken for a directory (the service hands
the engine hub ids in that form, so a worker never reads a directory that happens to bear the name).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

# The builtin models: the demo teacher and two tiny random models for tests (`models` builds them).
BUILTINS = ("smollm2-135m-instruct", "tiny-teacher", "tiny-student")


class ModelError(ValueError):
    """A model reference that cannot be used; the message says why and what to do."""


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def looks_like_hub_id(ref: str) -> bool:
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not ref.endswith("/")


def classify(ref: str) -> tuple[str, str | Path]:
    """("builtin", name), ("dir", path) or ("hub", id); raises ModelError for anything unusable."""
    if ref.startswith("builtin:"):
        name = ref.removeprefix("builtin:")
        if name not in BUILTINS:
            raise ModelError(
                f"unknown builtin model {ref!r}; builtins are: {', '.join('builtin:' + b for b in BUILTINS)}"
            )
        return "builtin", name
    if ref.startswith("hub:"):
        return _hub(ref.removeprefix("hub:"))
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{ref!r} is a directory but has no config.json: not a Hugging Face model directory")
        return "dir", path
    if not looks_like_hub_id(ref):
        raise ModelError(f"{ref!r}: no such model directory")
    return _hub(ref)


def _hub(ref: str) -> tuple[str, str]:
    if not looks_like_hub_id(ref):
        raise ModelError(f"{ref!r} is not a hub id (org/name)")
    if not hub_reachable():
        raise ModelError(
            f"{ref!r} is not a local directory, and the Hugging Face hub is not reachable from this machine: "
            "download the model where a hub is reachable and give its local directory"
        )
    return "hub", ref


def check_reference(ref: str) -> Path | None:
    """Validate a reference without building or downloading anything; its directory if it is local."""
    kind, value = classify(ref)
    return value if kind == "dir" else None
