"""Checks of a job spec that are cheap enough to run before a job is queued.

Returns problems as (field path, message) pairs, so an API can point at the field. Nothing is
built, downloaded or loaded, and neither torch nor transformers is imported: the API process runs
these. Whether teacher and student share a tokenizer needs both loaded; the worker checks that
first thing in a job (`models.check_compatible`), before anything is trained.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

from distill_client.models import DATA_FILES

from .corpus import check_corpus
from .data import TABLE_SUFFIXES, DataError, check_source
from .references import ModelError, check_reference
from .spec import JobSpec


def preflight(
    spec: JobSpec,
    upload: Callable[[str], str | None] = lambda _id: None,
    check_files: bool = True,
    skip: Collection[tuple] = (),
) -> list[tuple[tuple, str]]:
    """The spec's problems by field. `upload`: the file of an uploaded dataset (`dataset:ID`) on this
    machine, by id; None where there is none. Without `check_files`, model directories, data files and hub
    ids are left to the machine that reads them (an API that does not see the workers' files).
    Fields in `skip` are not looked at (a service refused them already, and must not even ask the
    disk about them)."""
    problems: list[tuple[tuple, str]] = []
    for loc, ref in (("teacher",), spec.teacher), (("student", "model"), spec.student.model):
        if ref is None or loc in skip or not (check_files or ref.startswith("builtin:")):
            continue
        try:
            check_reference(ref)
        except ModelError as err:
            problems.append((loc, str(err)))
    for key in DATA_FILES:
        source = getattr(spec.data, key)
        if source is None or ("data", key) in skip:
            continue
        if source.startswith("dataset:"):
            if (path := upload(source.removeprefix("dataset:"))) is None:
                problems.append((("data", key), f"{source}: no such uploaded dataset"))
            elif Path(path).suffix in TABLE_SUFFIXES and Path(path).exists():
                # A JSONL upload was checked record by record as it arrived; a table's columns are mapped
                # by this spec. Named as the user knows it, not by the server's path.
                try:
                    check_source(path, spec.data.columns)
                except DataError as err:
                    problems.append((("data", key), str(err).replace(path, source)))
            continue
        if not (check_files or source.startswith("builtin:")):
            continue
        try:
            check_corpus(source) if key == "pretrain" else check_source(source, spec.data.columns)
        except DataError as err:
            problems.append((("data", key), str(err)))
    return problems + minillm_problems(spec)


def rollouts_problem(spec: JobSpec) -> str | None:
    """Why a MiniLLM phase's rollouts do not split into whole minibatches on every process, if they
    do not (checked at submit, and by the stage itself)."""
    minibatch = spec.resources.devices * spec.training.batch_size * spec.training.gradient_accumulation
    if spec.minillm.rollouts_per_phase % minibatch:
        return (
            "must be a multiple of resources.devices × training.batch_size × training.gradient_accumulation "
            f"({minibatch})"
        )
    return None


def minillm_problems(spec: JobSpec) -> list[tuple[tuple, str]]:
    """How a MiniLLM spec's phases fail to fit its batches or its steps."""
    if spec.method != "minillm":
        return []
    if problem := rollouts_problem(spec):
        return [(("minillm", "rollouts_per_phase"), problem)]
    if spec.training.steps <= spec.updates_per_phase:
        return [
            (
                ("training", "steps"),
                f"MiniLLM would never sample new rollouts: each phase of minillm.rollouts_per_phase rollouts gives "
                f"{spec.updates_per_phase} updates (rollouts ÷ minibatch × minillm.ppo_epochs); make training.steps "
                f"several times that, or lower minillm.rollouts_per_phase or minillm.ppo_epochs",
            )
        ]
    return []
