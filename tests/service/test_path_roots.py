"""Tenant isolation of spec paths: a job reads server files only inside the operator's roots, and no
answer tells whether a file outside them exists. Checked at submit (the API shares the roots here)
and on the worker, where the files are read."""

import os
from pathlib import Path

import pytest
from helpers import make_user, submit, tiny_spec, wait_status
from pydantic import ValidationError

from app.core.config import Settings, get_settings
from app.core.path_roots import Roots, confine
from app.job_paths import hide_server_paths
from worker.engine.references import ModelError, classify
from worker.engine.spec import JobSpec

JOBS = "/api/v1/jobs"


def refusal(client, auth, spec, loc) -> str:
    response = client.post(JOBS, json=spec, headers=auth)
    assert response.status_code == 422, response.text
    return next(d["msg"] for d in response.json()["detail"] if d["loc"] == ["body", *loc])


@pytest.fixture
def outside(tmp_path_factory) -> Path:
    """A folder outside the roots (which are pytest's temporary folders in these tests)."""
    folder = Path(os.environ["DISTILL_ARTIFACTS_DIR"]).parent / "outside"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "secret.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    return folder


def test_a_path_outside_the_roots_is_refused_with_the_same_words_whether_or_not_it_exists(
    client, auth, dataset, outside
):
    exists, missing = str(outside / "secret.jsonl"), str(outside / "no-such.jsonl")
    said = [
        refusal(client, auth, tiny_spec(dataset, data={"train": path}), ("data", "train")) for path in (exists, missing)
    ]
    assert said[0].replace(exists, "PATH") == said[1].replace(missing, "PATH")
    assert "DISTILL_DATA_ROOTS" in said[0] and "dataset:ID" in said[0]
    for path in ("/etc/passwd", "/etc/no-such-file"):  # the server's own files, the same
        assert refusal(client, auth, tiny_spec(dataset, data={"train": path}), ("data", "train")).replace(
            path, "PATH"
        ) == said[0].replace(exists, "PATH")


def test_escapes_through_dotdot_symlinks_and_relative_paths_are_refused(client, auth, dataset, outside):
    link = dataset / "innocent.jsonl"
    link.symlink_to(outside / "secret.jsonl")  # inside a root, pointing out of it
    for path in (str(link), f"{dataset}/{os.path.relpath(outside, dataset)}/secret.jsonl"):  # dataset/../../outside
        assert "may read" in refusal(client, auth, tiny_spec(dataset, data={"train": path}), ("data", "train"))
    for path in ("train.jsonl", "~/train.jsonl", "../train.jsonl"):
        assert "absolute path" in refusal(client, auth, tiny_spec(dataset, data={"eval": path}), ("data", "eval"))
    assert "may read" in refusal(client, auth, tiny_spec(dataset, teacher=str(outside)), ("teacher",))
    # A relative model path is only ever a hub id, never a folder on the server (here: the artifacts')
    relative = os.path.relpath(os.environ["DISTILL_ARTIFACTS_DIR"])
    assert "absolute path" in refusal(
        client, auth, tiny_spec(dataset, student={"model": relative}), ("student", "model")
    )


def test_another_users_upload_cannot_be_read_by_its_server_path(client, auth, dataset):
    owner = make_user()
    body = b'{"instruction": "a private question", "output": "a private answer"}\n' * 4
    uploaded = client.post("/api/v1/datasets", params={"name": "private.jsonl"}, content=body, headers=owner).json()
    path = Path(os.environ["DISTILL_ARTIFACTS_DIR"]) / "datasets" / f"{uploaded['id']}.jsonl"
    assert path.is_file()  # the file is there, and still:
    assert "may read" in refusal(client, auth, tiny_spec(dataset, data={"train": str(path)}), ("data", "train"))
    assert "no such uploaded dataset" in refusal(
        client, auth, tiny_spec(dataset, data={"train": f"dataset:{uploaded['id']}"}), ("data", "train")
    )


def test_hub_models_only_where_the_operator_allows_them(client, auth, dataset, monkeypatch):
    monkeypatch.setattr(get_settings(), "allow_hub_models", False)
    assert "DISTILL_ALLOW_HUB_MODELS" in refusal(client, auth, tiny_spec(dataset, teacher="org/model"), ("teacher",))


def test_hub_ids_only_from_the_operators_list_when_there_is_one(tmp_path):
    roots = Roots(models=(), data=(), allow_hub=True, hub_models=("Qwen/*", "meta-llama/Llama-3.1-8B"))
    for teacher, allowed in (("Qwen/Qwen2.5-7B", True), ("meta-llama/Llama-3.1-8B", True), ("evil/huge", False)):
        spec = JobSpec.model_validate({"teacher": teacher, "student": {"model": "builtin:tiny-student"}})
        confined, problems = confine(spec, roots, on_disk=False)
        assert (problems == []) == allowed, (teacher, problems)
        if not allowed:
            assert (
                problems[0][1]
                == "'evil/huge': this service downloads only Qwen/*, meta-llama/Llama-3.1-8B (DISTILL_HUB_MODELS)"
            )
    assert Settings(hub_models="Qwen/*, org/model", model_roots=[], data_roots=[]).hub_models == ["Qwen/*", "org/model"]


def test_the_engine_gets_resolved_paths_and_marked_hub_ids(tmp_path):
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "train.jsonl"
    real.write_text("{}\n")
    (tmp_path / "data" / "alias.jsonl").symlink_to(real)
    roots = Roots(models=(tmp_path / "models",), data=(tmp_path / "data",), allow_hub=True)
    spec = JobSpec.model_validate(
        {
            "teacher": "org/model",
            "student": {"model": "builtin:tiny-student"},
            "data": {"train": str(tmp_path / "data" / "alias.jsonl"), "eval": "dataset:ds-1"},
        }
    )
    confined, problems = confine(spec, roots, on_disk=True)
    assert problems == []
    assert (confined.teacher, confined.student.model) == ("hub:org/model", "builtin:tiny-student")
    assert (confined.data.train, confined.data.eval) == (str(real), "dataset:ds-1")
    explicit, problems = confine(spec.model_copy(update={"teacher": "hub:org/model"}), roots, on_disk=True)
    assert (explicit.teacher, problems) == ("hub:org/model", [])  # the explicit form is kept, not doubled
    # Without the disk (an API that does not share the roots) only the lexical form is checked.
    lexical, problems = confine(
        spec.model_copy(update={"data": spec.data.model_copy(update={"train": "/elsewhere/x"})}), roots, on_disk=False
    )
    assert [loc for loc, _ in problems] == [("data", "train")]


def test_the_kernels_and_devices_file_systems_are_refused_whatever_the_roots():
    """Even an operator whose roots are the whole disk serves no /proc, /sys or /dev entry, as given or as
    resolved: /proc/1/root is the root directory, /proc/self/fd/0 a pipe, /dev/zero never ends."""
    everything = Roots(models=(Path("/"),), data=(Path("/"),), allow_hub=False)
    for on_disk in (True, False):
        spec = JobSpec.model_validate(
            {
                "teacher": "/proc/1/root",
                "student": {"model": "/proc/1/cwd"},
                "data": {"train": "/dev/zero", "eval": "/proc/1/root/etc/shadow", "pretrain": "/sys/kernel/notes"},
            }
        )
        _, problems = confine(spec, everything, on_disk=on_disk)
        assert [loc for loc, _ in problems] == [
            ("teacher",),
            ("student", "model"),
            ("data", "train"),
            ("data", "eval"),
            ("data", "pretrain"),
        ]
        assert all("this service may read" in problem for _, problem in problems)
    fine = JobSpec.model_validate({"teacher": "/etc", "student": {"model": "/etc"}, "data": {"train": "/etc/hostname"}})
    assert confine(fine, everything, on_disk=True)[1] == []  # the rule is about those file systems only


def test_a_hub_reference_is_never_read_as_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "org" / "model").mkdir(parents=True)
    (tmp_path / "org" / "model" / "config.json").write_text("{}")
    assert classify("org/model")[0] == "dir"  # the engine on its own: a local folder wins (the CLI's `distill train`)
    with pytest.raises(ModelError, match="hub is not reachable"):
        classify("hub:org/model")


def test_roots_that_overlap_the_services_own_files_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="overlaps the service's own files"):
        Settings(data_dir=tmp_path / "data", data_roots=str(tmp_path), model_roots=[])
    with pytest.raises(ValidationError, match="absolute"):
        Settings(data_dir=tmp_path / "data", model_roots="models", data_roots=[])
    settings = Settings(data_dir=tmp_path / "data", data_roots=f"{tmp_path / 'a'}:{tmp_path / 'b'}", model_roots=[])
    assert settings.data_roots == [tmp_path / "a", tmp_path / "b"]


def test_server_paths_are_shown_relative_to_the_job():
    settings = get_settings()
    job = settings.resolved_artifacts_dir / "jobs" / "job-1"
    text = (
        f"checkpoint step 3: {job}/checkpoints/step-000003; another job: {settings.resolved_artifacts_dir}/jobs/job-2; "
        f"the job itself: {job}; a longer name: {settings.resolved_artifacts_dir}-old/x"
    )
    assert hide_server_paths({"m": [text]}, settings, "job-1") == {
        "m": [
            "checkpoint step 3: checkpoints/step-000003; another job: <artifacts>/jobs/job-2; "
            f"the job itself: .; a longer name: {settings.resolved_artifacts_dir}-old/x"
        ]
    }


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_jobs")
def test_the_worker_checks_the_roots_where_it_reads_the_files(client, auth, dataset, outside, worker, monkeypatch):
    """An API that does not see the workers' files checks only where a path points; the worker
    resolves it and refuses a symlink out of the roots before reading anything."""
    link = dataset / "looks-fine.jsonl"
    link.symlink_to(outside / "secret.jsonl")
    monkeypatch.setattr(get_settings(), "api_sees_worker_files", False)
    job_id = submit(client, auth, tiny_spec(dataset, data={"train": str(link)}))
    done = wait_status(client, auth, job_id, {"succeeded", "failed"}, timeout=120)
    assert done["status"] == "failed" and done["error"]["code"] == "SpecRefused"
    assert "data.train" in done["error"]["message"] and "may read" in done["error"]["message"]


def test_the_worker_runs_the_submit_checks_again_where_the_files_are(client, auth, dataset, tmp_path):
    """Between submit and run a file can go; the worker's check (the API's, on its own disk) names
    the field before anything is loaded."""
    from app import acceptance
    from app.core.db import session_factory
    from app.models import Dataset, Job
    from worker.job_process import readable_spec

    (tmp_path / "train.jsonl").write_text((dataset / "train.jsonl").read_text())
    upload = client.post(
        "/api/v1/datasets", params={"name": "eval.jsonl"}, content=(dataset / "eval.jsonl").read_bytes(), headers=auth
    ).json()
    job_id = submit(
        client,
        auth,
        tiny_spec(dataset, data={"train": str(tmp_path / "train.jsonl"), "eval": f"dataset:{upload['id']}"}),
    )
    with session_factory()() as session:
        job = session.get(Job, job_id)
        ready = readable_spec(job, session, get_settings())
        assert ready.data.train == str((tmp_path / "train.jsonl").resolve())
        assert Path(ready.data.eval).read_bytes() == (dataset / "eval.jsonl").read_bytes()  # the upload's file
        (tmp_path / "train.jsonl").unlink()
        session.delete(session.get(Dataset, upload["id"]))  # as an operator removing it would
        session.commit()
        with pytest.raises(acceptance.Refused) as refused:
            readable_spec(job, session, get_settings())
    assert "data.train: " in str(refused.value) and "no such file" in str(refused.value)
    assert f"data.eval: dataset:{upload['id']}: no such uploaded dataset" in str(refused.value)
