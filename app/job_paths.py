"""Where a job's files and uploaded datasets live on a machine, and how paths appear to a user.

Events, errors and logs a user reads name files relative to the job's folder (`checkpoints/step-6`),
never as the server's absolute paths: those would tell every user how the servers are laid out.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from app.core.config import Settings
from worker.engine.data import TABLE_SUFFIXES
from worker.engine.paths import PROJECT_ROOT, cache_dir


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.resolved_artifacts_dir / "jobs" / job_id


def dataset_file(settings: Settings, dataset_id: str, name: str) -> Path:
    """An uploaded dataset on this machine: where the API stores it, or where a worker on another
    machine copies it from the bucket. A Parquet or Arrow upload (by its `name`) keeps its suffix, by
    which the engine reads it; anything else is JSONL."""
    suffix = Path(name).suffix.lower()
    return (
        settings.resolved_artifacts_dir / "datasets" / f"{dataset_id}{suffix if suffix in TABLE_SUFFIXES else '.jsonl'}"
    )


def hide_server_paths(value, settings: Settings, job_id: str):
    """`value` (a string, or dicts and lists of them) with server folders named by what they are:
    the job's own folder dropped (its paths become relative), the others as <artifacts>, <cache>,
    <distill> (the installed code) and <python>."""
    if isinstance(value, dict):
        return {k: hide_server_paths(v, settings, job_id) for k, v in value.items()}
    if isinstance(value, list):
        return [hide_server_paths(v, settings, job_id) for v in value]
    if not isinstance(value, str):
        return value
    # Longest first: the job's folder lies inside the artifacts folder, the venv inside the code's.
    for folder, name in sorted(_named_folders(settings, job_id).items(), key=lambda item: -len(item[0])):
        # Only the folder itself, never a longer name it begins (/srv/proj is not in /srv/project2).
        value = re.sub(
            re.escape(folder) + r"(/|(?![\w.-]))", lambda m: name if m.group(1) else name.rstrip("/") or ".", value
        )
    return value


def _named_folders(settings: Settings, job_id: str) -> dict[str, str]:
    return {
        str(job_dir(settings, job_id)): "",
        str(settings.resolved_artifacts_dir): "<artifacts>/",
        str(cache_dir()): "<cache>/",
        str(PROJECT_ROOT): "<distill>/",
        sys.prefix: "<python>/",
    }
