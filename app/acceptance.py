"""One way in for a job spec: the checks it passes wherever it enters, each rule written once.

The API runs them at submit and validate, the worker again before it runs the job (on the machine
that reads the files, where a path resolves to what will really be read), and `distill train` before
a run without the service. What differs between them is only what the machine may read, a `Reader`:

- where the paths may point: the operator's roots on a service (`path_roots.confine`), anywhere the
  user can read on their own machine;
- whether models and data are on this machine's disk, so that they can be looked at (an API that
  does not share the workers' files checks only the references' form);
- which uploads (`dataset:ID`) the job's owner has, and where their files lie here.

What is not about the spec stays with its caller: the webhook of a request (`webhooks.spec_problems`,
the API's) and which queue a job goes to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

from app.core.path_roots import Problem, Roots, confine
from worker.engine.preflight import preflight
from worker.engine.spec import DATA_FILES, JobSpec


def _no_uploads(_dataset_id: str) -> str | None:
    return None


@dataclass(frozen=True)
class Reader:
    """The machine a spec is checked on, and what it may read there."""

    roots: Roots | None  # the operator's roots; None: the user's own machine, where any path they can read is theirs
    reads_files: bool  # the models and data named by path are on this machine's disk
    upload: Callable[[str], str | None] = _no_uploads  # the file of one of the owner's uploads, by id; None: none such


class Refused(ValueError):
    """A spec that may not run here; the message names each bad field."""


def check(spec: JobSpec, reader: Reader) -> tuple[JobSpec, list[Problem]]:
    """The spec with its references in the form the engine reads (server paths resolved, hub ids
    marked), and its problems by field: paths, models, data, shapes."""
    confined, problems = (spec, []) if reader.roots is None else confine(spec, reader.roots, on_disk=reader.reads_files)
    problems += preflight(
        confined,
        lambda dataset_id: reader.upload(dataset_id) is not None,
        reader.reads_files,
        skip={loc for loc, _ in problems},  # refused already: the disk is not even asked about them
    )
    return confined, problems


def runnable(spec: JobSpec, reader: Reader) -> JobSpec:
    """The spec as the engine runs it on this machine (`check`'s, with each upload replaced by its
    file); Refused, naming every problem, if it has any."""
    reader = replace(reader, upload=cache(reader.upload))  # each upload looked up once (a query on a service)
    confined, problems = check(spec, reader)
    if problems:
        raise Refused("; ".join(f"{'.'.join(map(str, loc))}: {message}" for loc, message in problems))
    uploads = {
        key: reader.upload(ref.removeprefix("dataset:"))
        for key in DATA_FILES
        if (ref := getattr(confined.data, key)) is not None and ref.startswith("dataset:")
    }
    return confined.model_copy(update={"data": confined.data.model_copy(update=uploads)})
