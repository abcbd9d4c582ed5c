"""Checks of a job spec that are cheap enough to run before a job is queued.

Returns problems as (field path, message) pairs, so an API can point at the field. Nothing is
built or downloaded; tokenizers are compared only when both models are local directories.
"""

from __future__ import annotations

from collections.abc import Callable

from .corpus import check_corpus
from .data import DataError, resolve_source
from .models import ModelError, check_compatible, check_reference
from .spec import DATA_FILES, JobSpec
from .stages import check


def preflight(spec: JobSpec, dataset_exists: Callable[[str], bool] = lambda _id: False) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
    dirs = {}
    for loc, ref in (("teacher",), spec.teacher), (("student", "model"), spec.student.model):
        if ref is None:
            continue
        try:
            dirs[loc[0]] = check_reference(ref)
        except ModelError as err:
            problems.append((loc, str(err)))
    if dirs.get("teacher") and dirs.get("student"):
        try:
            check_compatible(dirs["teacher"], dirs["student"])
        except ModelError as err:
            problems.append((("student", "model"), str(err)))
    for key in DATA_FILES:
        source = getattr(spec.data, key)
        if source is None:
            continue
        if source.startswith("dataset:"):
            if not dataset_exists(source.removeprefix("dataset:")):
                problems.append((("data", key), f"{source}: no such uploaded dataset"))
            continue
        try:
            (check_corpus if key == "pretrain" else resolve_source)(source)
        except DataError as err:
            problems.append((("data", key), str(err)))
    problems += check(spec)
    return problems
