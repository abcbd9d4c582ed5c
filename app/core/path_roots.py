"""Which server files a job may read: tenant isolation of the paths in a job spec.

A spec names models (`teacher`, `student.model`) and data (`data.train`, ...). On a shared service
those strings must never reach other users' files (their uploads and checkpoints live under the
artifacts folder) or the servers' own (`/etc/passwd`). So a spec may name, besides `builtin:NAME`
`dataset:ID` and `job:ID` (whose owner the API checks):

- a server path only inside the roots an operator configures, models and data apart, and only as
  an absolute path; it is resolved, symlinks included, before the check, and the engine then reads
  the resolved path;
- a hub id (`org/name`) where the operator allows hub models; the engine gets it as `hub:org/name`,
  so that it never looks for a directory of that name on the worker's disk.

A path outside the roots is refused with the same words whether or not it exists: no answer maps
the servers' disks. `confine` runs on the worker, where the files are read, and at submit on the
API, which resolves and checks the paths on its own disk only where it shares the workers' roots.
No torch here: the API imports this module.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from distill_client.models import DATA_FILES
from worker.engine.references import looks_like_hub_id
from worker.engine.spec import JobSpec

Problem = tuple[tuple, str]


@dataclass(frozen=True)
class Roots:
    models: tuple[Path, ...]
    data: tuple[Path, ...]
    allow_hub: bool
    hub_models: tuple[str, ...] = ()  # patterns of the hub ids allowed; empty: any

    @classmethod
    def of(cls, settings) -> Roots:
        return cls(
            tuple(settings.model_roots),
            tuple(settings.data_roots),
            settings.allow_hub_models,
            tuple(settings.hub_models),
        )


# The kernel's and the devices' file systems hold no model or data file, and some of their entries never
# end (/dev/zero, /proc/kcore), block (a FIFO) or lead elsewhere (/proc/1/root is the root directory):
# refused whatever the roots, as given and as resolved.
SPECIAL = (Path("/proc"), Path("/sys"), Path("/dev"))


def _special(path: str | Path) -> bool:
    return any(Path(path).is_relative_to(special) for special in SPECIAL)


def _inside(value: str, roots: tuple[Path, ...], on_disk: bool) -> str | None:
    """`value` resolved (on disk: symlinks too, else only lexically) if that lies inside one of
    `roots` and outside SPECIAL, else None. The roots are resolved the same way."""
    resolve = os.path.realpath if on_disk else os.path.normpath
    if _special(os.path.normpath(value)):
        return None
    try:
        path = Path(resolve(value))
    except OSError:  # a link that cannot be followed (/proc/N/root of another user): nothing to read there
        return None
    if _special(path):
        return None
    for root in roots:
        if path.is_relative_to(resolve(root)):
            return str(path)
    return None


def _where(roots: tuple[Path, ...], setting: str) -> str:
    if not roots:
        return f"this service reads no server paths for them ({setting} is empty)"
    return f"they must lie inside {', '.join(str(r) for r in roots)} ({setting})"


def _model(ref: str, roots: Roots, on_disk: bool) -> tuple[str | None, str | None]:
    """(reference for the engine, None) or (None, the problem)."""
    if ref.startswith(("builtin:", "job:")):  # job:ID: a checkpoint of the owner's, which the caller checks
        return ref, None
    where_models = _where(roots.models, "DISTILL_MODEL_ROOTS")
    if os.path.isabs(ref):
        resolved = _inside(ref, roots.models, on_disk)
        if resolved is None:
            return None, f"{ref!r} is not a model directory this service may read: {where_models}"
        return resolved, None
    ref = ref.removeprefix("hub:")  # the explicit form of a hub id
    if looks_like_hub_id(ref):
        if not roots.allow_hub:
            return None, (
                f"{ref!r}: this service does not download hub models (DISTILL_ALLOW_HUB_MODELS is off); "
                f"use builtin:NAME or a model directory inside {where_models}"
            )
        if roots.hub_models and not any(fnmatch.fnmatchcase(ref, pattern) for pattern in roots.hub_models):
            return None, f"{ref!r}: this service downloads only {', '.join(roots.hub_models)} (DISTILL_HUB_MODELS)"
        return f"hub:{ref}", None
    return (
        None,
        f"{ref!r}: give builtin:NAME, a hub id (org/name), job:ID (a checkpoint of your earlier job) or an "
        f"absolute path of a model directory; {where_models}",
    )


def _data(source: str, roots: Roots, on_disk: bool) -> tuple[str | None, str | None]:
    if source.startswith(("builtin:", "dataset:")):
        return source, None
    if source.startswith("hf:"):
        if not roots.allow_hub:
            return None, f"{source!r}: this service does not download from the hub (DISTILL_ALLOW_HUB_MODELS is off)"
        return source, None
    advice = "upload the file (POST /api/v1/datasets; `distill submit` does it for local files) and give dataset:ID"
    if os.path.isabs(source):
        resolved = _inside(source, roots.data, on_disk)
        if resolved is None:
            where = _where(roots.data, "DISTILL_DATA_ROOTS")
            return None, f"{source!r} is not a file this service may read: {where}; or {advice}"
        return resolved, None
    return None, f"{source!r}: give builtin:NAME, dataset:ID or an absolute path; {advice}"


def confine(spec: JobSpec, roots: Roots, *, on_disk: bool) -> tuple[JobSpec, list[Problem]]:
    """The spec with every model and data reference it may use in the form the engine reads (server
    paths resolved, hub ids marked), and the problems of those it may not, by field (those fields
    are left as they were)."""
    problems: list[Problem] = []

    def check(loc: tuple, value: str | None, kind) -> str | None:
        if value is None:
            return None
        confined, problem = kind(value, roots, on_disk)
        if problem:
            problems.append((loc, problem))
        return confined or value

    teacher = check(("teacher",), spec.teacher, _model)
    student = check(("student", "model"), spec.student.model, _model)
    data = {key: check(("data", key), getattr(spec.data, key), _data) for key in DATA_FILES}
    confined = spec.model_copy(
        update={
            "teacher": teacher,
            "student": spec.student.model_copy(update={"model": student}),
            "data": spec.data.model_copy(update=data),
        }
    )
    return confined, problems
