"""Files that hold secrets: private (0600) from the moment they exist,
and never seen half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _private_temp(path: Path, text: str) -> Path:
    """A new file beside `path`, created 0600 (mkstemp's mode), holding `text` on disk."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    return Path(tmp)


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step; readers see the old file or the new one, both 0600."""
    os.replace(_private_temp(path, text), path)


def create_private_once(path: Path, text: str) -> str:
    """`path`'s contents, creating it with `text` if it does not exist. Of processes racing to
    create it, exactly one succeeds (a hard link fails if the name is taken) and all read its text."""
    if not path.exists():
        tmp = _private_temp(path, text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        finally:
            tmp.unlink()
    return path.read_text()
