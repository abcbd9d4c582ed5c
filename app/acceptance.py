"""One way in for a job spec: the checks it passes wherever it enters, each rule written once.

The API runs them at submit and validate, the worker again before it runs the job (on the machine
that reads the files, where a path resolves to what will really be read), and `distill train` before
a run without the service. What differs between them is only what the machine may read, a `Reader`:

- where the paths may point: the operator's roots on a service (`path_roots.confine`), anywhere the
  user can read on their own machine;
- whether models and data are on this machine's disk, so that they can be looked at (an API that
  does not share the workers' files checks only the references' form);
- which uploads (`dataset:ID`) the job's owner has, and where their files lie here;
- which checkpoints of the owner's earlier jobs (`job:ID@best`, app/job_refs.py) a model may be, and
  where their directories lie here.

What is not about the spec stays with its caller: the webhook of a request (`webhooks.spec_problems`,
the API's) and which queue a job goes to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

from app.core.path_roots import Problem, Roots, confine
from distill_client.models import DATA_FILES
from worker.engine.preflight import preflight
from worker.engine.spec import JobSpec


def _none(_reference: str) -> str | None:
    return None


# The spec fields that name a model: where they are, and how to read them.
MODEL_FIELDS = ((("teacher",), lambda spec: spec.teacher), (("student", "model"), lambda spec: spec.student.model))
JOB = "job:"  # a model that is a checkpoint of an earlier job of the owner's


@dataclass(frozen=True)
class Reader:
    """The machine a spec is checked on, and what it may read there."""

    roots: Roots | None  # the operator's roots; None: the user's own machine, where any path they can read is theirs
    reads_files: bool  # the models and data named by path are on this machine's disk
    upload: Callable[[str], str | None] = _none  # the file of one of the owner's uploads, by id; None: none such
    checkpoint: Callable[[str], str | None] = _none  # the directory a job:ID reference names here; None: none such


class Refused(ValueError):
    """A spec that may not run here; the message names each bad field."""


def check(spec: JobSpec, reader: Reader) -> tuple[JobSpec, list[Problem]]:
    """The spec with its references in the form the engine reads (server paths resolved, hub ids
    marked), and its problems by field: paths, models, data, shapes."""
    confined, problems = (spec, []) if reader.roots is None else confine(spec, reader.roots, on_disk=reader.reads_files)
    checkpoints, unknown = _checkpoints(confined, reader)
    # The files of the checkpoints named are looked at; the spec keeps their names.
    problems += unknown + preflight(
        _with_models(confined, checkpoints),
        reader.upload,
        reader.reads_files,
        skip={loc for loc, _ in problems + unknown},  # refused already: the disk is not even asked about them
    )
    return confined, problems


def _checkpoints(spec: JobSpec, reader: Reader) -> tuple[dict[tuple, str], list[Problem]]:
    """The directories of the models that are job:ID references, by field, and the problems of those
    that name nothing of the owner's."""
    found, problems = {}, []
    for loc, get in MODEL_FIELDS:
        if (ref := get(spec)) is not None and ref.startswith(JOB):
            if (directory := reader.checkpoint(ref)) is not None:
                found[loc] = directory
            else:
                problems.append(
                    (loc, f"{ref}: no such job of yours with that checkpoint (job:ID, job:ID@best, @latest or @step-N)")
                )
    return found, problems


def _with_models(spec: JobSpec, models: dict[tuple, str]) -> JobSpec:
    student = spec.student.model_copy(update={"model": models.get(("student", "model"), spec.student.model)})
    return spec.model_copy(update={"teacher": models.get(("teacher",), spec.teacher), "student": student})


def runnable(spec: JobSpec, reader: Reader) -> JobSpec:
    """The spec as the engine runs it on this machine (`check`'s, with each upload replaced by its
    file); Refused, naming every problem, if it has any."""
    # Each upload and checkpoint looked up once (a query on a service; a checkpoint may come from a bucket).
    reader = replace(reader, upload=cache(reader.upload), checkpoint=cache(reader.checkpoint))
    confined, problems = check(spec, reader)
    if problems:
        raise Refused("; ".join(f"{'.'.join(map(str, loc))}: {message}" for loc, message in problems))
    uploads = {
        key: reader.upload(ref.removeprefix("dataset:"))
        for key in DATA_FILES
        if (ref := getattr(confined.data, key)) is not None and ref.startswith("dataset:")
    }
    confined = _with_models(confined, _checkpoints(confined, reader)[0])
    return confined.model_copy(update={"data": confined.data.model_copy(update=uploads)})
