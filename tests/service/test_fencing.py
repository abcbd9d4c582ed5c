"""Attempt fencing is atomic with the write: a stale attempt (its job taken over while it still ran)
can neither write nor delete anything of the attempt that took over, even in between the check and
the write. The reporter writes behind the training loop, which never waits for it."""

import threading
import time
from datetime import timedelta
from pathlib import Path

from helpers import submit, tiny_spec
from sqlalchemy import select, update

from app import crud, job_status
from app.core.db import session_factory
from app.models import QUEUED, Checkpoint, Job
from worker.engine.events import Event
from worker.reporter import DbReporter


def running_job(client, auth, dataset) -> str:
    job_id = submit(client, auth, tiny_spec(dataset))
    with session_factory()() as session:
        assert job_status.claim(session, job_id, "w1") == 1
    return job_id


def take_over(job_id: str) -> None:
    """What the reaper and the next worker do when attempt 1 stops sending heartbeats."""
    with session_factory()() as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=Job.heartbeat_at - timedelta(hours=1)))
        session.commit()
        reaped = job_status.reap_stale(session, timedelta(seconds=1))
        # The API's own reaper (the client fixture runs its lifespan) may have queued it again first.
        assert job_id in reaped or session.scalar(select(Job.status).where(Job.id == job_id)) == QUEUED
        assert job_status.claim(session, job_id, "w2") == 2


def test_a_take_over_waits_for_the_write_that_passed_the_fence(client, auth, dataset):
    job_id = running_job(client, auth, dataset)
    Session = session_factory()
    stale = Session()
    assert job_status.hold(stale, job_id, 1) == "running"
    taken = threading.Thread(target=take_over, args=(job_id,))
    taken.start()
    time.sleep(1.0)
    assert taken.is_alive()  # the reaper waits on the held row ...
    crud.stage_event(stale, job_id, "metrics", "", data={"step": 1, "values": {"loss": 1.0}})
    stale.commit()  # ... until the write that passed the fence has committed
    taken.join(timeout=30)
    assert not taken.is_alive()
    with Session() as session:
        assert session.get(Job, job_id).attempts == 2
        assert job_status.hold(session, job_id, 1) is None  # from now on attempt 1 is fenced off
        assert job_status.hold(session, job_id, 2) == "running"


def test_a_stale_attempt_writes_and_deletes_nothing(client, auth, dataset, tmp_path):
    job_id = running_job(client, auth, dataset)
    take_over(job_id)
    current = DbReporter(job_id, 2)
    folder = tmp_path / "checkpoints" / "step-000003"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    current.emit(Event("checkpoint", "checkpoint step 3", data={"step": 3, "path": str(folder)}))
    current.emit(Event("metrics", data={"step": 3, "stage": "minillm", "values": {"loss": 2.0}}))
    assert current.flush(seconds=30)

    stale = DbReporter(job_id, 1)
    stale.emit(Event("metrics", data={"step": 3, "values": {"loss": 9.0}}))
    stale.emit(Event("checkpoint", "checkpoint step 3", data={"step": 3, "path": str(folder)}))
    stale.emit(Event("state", "failed", "error", {"state": "failed", "error": {"code": "X", "message": "stale"}}))
    assert stale.flush(seconds=30)
    with session_factory()() as session:
        assert crud.metric_series(session, job_id) == {"loss": [{"step": 3, "value": 2.0, "stage": "minillm"}]}
        rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
        assert [(c.step, c.archive_path.endswith("step-000003-attempt-2.tar")) for c in rows] == [(3, True)]
        assert session.get(Job, job_id).status == "running"
    assert [p.name for p in (tmp_path / "archives").iterdir()] == [
        "step-000003-attempt-2.tar"
    ]  # none of the stale one's


def test_a_resumed_attempt_replaces_the_points_of_the_steps_it_runs_again(client, auth, dataset):
    job_id = running_job(client, auth, dataset)
    first = DbReporter(job_id, 1)
    for step in (1, 2, 3):
        first.emit(Event("metrics", data={"step": step, "values": {"loss": 10.0 + step}}))
    assert first.flush(seconds=30)
    take_over(job_id)  # resumes from a checkpoint at step 1: steps 2 and 3 run again
    second = DbReporter(job_id, 2)
    for step in (2, 3):
        second.emit(Event("metrics", data={"step": step, "values": {"loss": 20.0 + step}}))
    assert second.flush(seconds=30)
    with session_factory()() as session:
        points = crud.metric_series(session, job_id)["loss"]
        assert crud.latest_metrics(session, [job_id]) == {job_id: {"step": 3, "stage": None, "loss": 23.0}}
    assert [(p["step"], p["value"]) for p in points] == [(1, 11.0), (2, 22.0), (3, 23.0)]


def test_a_heartbeat_that_lands_while_the_reaper_waits_keeps_the_job(client, auth, dataset):
    """The reaper picks silent jobs with one query and moves them with another: a heartbeat committed
    in between means the worker is alive, and the job stays its."""
    job_id = running_job(client, auth, dataset)
    Session = session_factory()
    with Session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=Job.heartbeat_at - timedelta(hours=1)))
        session.commit()
    worker = Session()
    assert job_status.hold(worker, job_id, 1) == "running"  # the worker is writing: the reaper's update waits
    requeued = []
    reaper = threading.Thread(target=lambda: requeued.extend(job_status.reap_stale(Session(), timedelta(seconds=60))))
    reaper.start()
    time.sleep(1.0)
    assert reaper.is_alive()
    assert job_status.heartbeat(worker, job_id, 1)  # the worker's heartbeat commits (and frees the row)
    reaper.join(timeout=30)
    assert requeued == []
    with Session() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.attempts) == ("running", 1)


def test_the_training_loop_waits_on_neither_the_database_nor_a_checkpoint_s_archive(client, auth, dataset, tmp_path):
    """Rank 0 emits and goes on training (the other ranks wait for it in their next collective): the
    events, a checkpoint's archive and hashes among them, are written behind it, in order."""
    job_id = running_job(client, auth, dataset)
    reporter = DbReporter(job_id, 1)
    folder = tmp_path / "checkpoints" / "step-000002"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 1000)
    blocker = session_factory()()
    assert job_status.hold(blocker, job_id, 1) == "running"  # the job's row is locked: every write waits
    try:
        emitting = threading.Thread(
            target=lambda: [
                reporter.emit(Event("checkpoint", "checkpoint step 2", data={"step": 2, "path": str(folder)})),
                reporter.emit(Event("metrics", data={"step": 2, "values": {"loss": 1.5}})),
            ]
        )
        emitting.start()
        emitting.join(timeout=10)
        assert not emitting.is_alive()  # emit returned while nothing could be written
        assert not reporter.flush(seconds=1)
    finally:
        blocker.rollback()
    assert reporter.flush(seconds=30)
    with session_factory()() as session:
        (checkpoint,) = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
        assert checkpoint.step == 2 and Path(checkpoint.archive_path).exists()
        assert [p["value"] for p in crud.metric_series(session, job_id)["loss"]] == [1.5]
