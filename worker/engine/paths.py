"""Where the engine keeps things it builds once and reuses (converted models, teacher outputs)."""

import os
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Written last into a resume state's folder (OUTPUT/resume/step-N/): a folder without it is incomplete.
RESUME_STATE_FILE = "trainer_state.json"


def cache_dir() -> Path:
    """`DISTILL_CACHE_DIR`, else `.cache/` in the project checkout (never the home directory)."""
    path = Path(os.environ.get("DISTILL_CACHE_DIR") or PROJECT_ROOT / ".cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: a killed writer leaves no half file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
