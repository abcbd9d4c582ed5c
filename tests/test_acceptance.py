"""One way in for a spec (app/acceptance.py): the same checks for the API, the worker and `distill
train`, told apart only by what the machine may read."""

import json

import pytest

from app.acceptance import Reader, Refused, check, runnable
from app.core.path_roots import Roots
from worker.engine.spec import JobSpec

TINY = {"teacher": "builtin:tiny-teacher", "student": {"model": "builtin:tiny-student"}}


def spec(**data) -> JobSpec:
    return JobSpec.model_validate({**TINY, "data": data})


@pytest.fixture
def files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    return tmp_path


def test_a_service_refuses_a_path_outside_its_roots_without_asking_the_disk_about_it(files):
    reader = Reader(Roots(models=(), data=(files / "data",), allow_hub=False), reads_files=True)
    _, problems = check(spec(train=str(files / "elsewhere.jsonl")), reader)
    # One problem: the root's, not also preflight's "no such file", which would tell the file is missing.
    assert [(loc, "may read" in message) for loc, message in problems] == [(("data", "train"), True)]
    assert check(spec(train=str(files / "data" / "train.jsonl")), reader)[1] == []


def test_an_api_that_does_not_see_the_files_checks_only_their_form(files):
    reader = Reader(Roots(models=(), data=(files / "data",), allow_hub=False), reads_files=False)
    assert check(spec(train=str(files / "data" / "missing.jsonl")), reader)[1] == []
    where_files_are = Reader(reader.roots, reads_files=True)
    with pytest.raises(Refused, match=r"data\.train: .*no such file"):
        runnable(spec(train=str(files / "data" / "missing.jsonl")), where_files_are)


def test_a_run_on_the_users_own_machine_reads_any_path_they_can(files, monkeypatch):
    monkeypatch.chdir(files)
    local = Reader(roots=None, reads_files=True)
    assert runnable(spec(train="data/train.jsonl"), local).data.train == "data/train.jsonl"
    with pytest.raises(Refused, match=r"data\.train: data/nope\.jsonl: no such file"):
        runnable(spec(train="data/nope.jsonl"), local)
    with pytest.raises(Refused, match=r"data\.train: dataset:ds-1: no such uploaded dataset"):
        runnable(spec(train="dataset:ds-1"), local)  # uploads are the service's


def test_uploads_become_their_files_and_every_problem_is_named(files):
    uploaded = str(files / "data" / "train.jsonl")
    reader = Reader(Roots(models=(), data=(), allow_hub=False), reads_files=True, upload={"ds-1": uploaded}.get)
    assert runnable(spec(train="dataset:ds-1"), reader).data.train == uploaded
    shapes = {"training": {"batch_size": 3}, "minillm": {"rollouts_per_phase": 4}}
    bad = JobSpec.model_validate({**TINY, **shapes, "data": {"train": "dataset:ds-2", "eval": "/etc/passwd"}})
    with pytest.raises(Refused) as refused:
        runnable(bad, reader)
    said = str(refused.value)
    assert "data.train: dataset:ds-2: no such uploaded dataset" in said
    assert "data.eval: '/etc/passwd' is not a file this service may read" in said
    assert "minillm.rollouts_per_phase: must be a multiple of" in said


def test_a_job_reference_becomes_its_checkpoint_directory_which_is_looked_at_and_the_spec_keeps_the_name(files):
    checkpoint = files / "jobs" / "job-1" / "checkpoints" / "step-000006"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    (files / "empty").mkdir()  # a directory that is no model: what a lost checkpoint copy looks like
    names = {"job:job-1@best": str(checkpoint), "job:job-1@latest": str(files / "empty")}
    reader = Reader(Roots(models=(), data=(files / "data",), allow_hub=False), reads_files=True, checkpoint=names.get)
    data = {"train": str(files / "data" / "train.jsonl")}
    chained = JobSpec.model_validate({**TINY, "student": {"model": "job:job-1@best"}, "data": data})
    confined, problems = check(chained, reader)
    assert problems == [] and confined.student.model == "job:job-1@best"  # outside the model roots, and the owner's
    assert runnable(chained, reader).student.model == str(checkpoint)

    bad = JobSpec.model_validate(
        {**TINY, "teacher": "job:job-2", "student": {"model": "job:job-1@latest"}, "data": data}
    )
    _, problems = check(bad, reader)
    assert [loc for loc, _ in problems] == [("teacher",), ("student", "model")]
    assert "job:job-2: no such job of yours with that checkpoint" in problems[0][1]
    assert "no config.json" in problems[1][1]  # the directory named is looked at like any model's


def test_a_hub_dataset_needs_a_service_that_downloads_from_the_hub_and_a_reachable_hub(files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for allow_hub, said in ((False, "does not download from the hub"), (True, "hub is not reachable")):
        reader = Reader(Roots(models=(), data=(), allow_hub=allow_hub), reads_files=True)
        _, problems = check(spec(train="hf:databricks/dolly:train"), reader)
        assert [loc for loc, _ in problems] == [("data", "train")] and said in problems[0][1], problems
