"""The engine's reporter inside the service: every event goes to the database as it happens.

Writes are fenced by the attempt number: once the job belongs to another attempt (its worker was
presumed lost and the job was taken up again) or has ended, this process writes nothing more and
is asked to stop.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections import deque
from pathlib import Path

from sqlalchemy import delete, select

from app import crud
from app.core.db import session_factory
from app.core.files import sha256_file
from app.core.outage import OUTAGE, through_outage
from app.core.storage import s3_store
from app.models import CANCELLED, FAILED, RUNNING, SUCCEEDED, Checkpoint, EvalResult, Job, Metric
from worker.engine.events import Event

log = logging.getLogger(__name__)


def build_archive(directory: Path, archive: Path) -> None:
    """An uncompressed tar of a checkpoint directory (safetensors barely compress), the same bytes
    every time: sorted names, no owners, fixed times. Written aside, then renamed into place."""
    partial = archive.with_name("." + archive.name + ".partial")

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=f"{directory.name}/{path.name}", filter=normalise)
    partial.rename(archive)


class DbReporter:
    def __init__(self, job_id: str, attempt: int):
        self.job_id, self.attempt = job_id, attempt
        self.Session = session_factory()
        self.parent = os.getppid()
        self.store = s3_store()
        self.pending: deque[Event] = deque()  # written in order; more than one only during an outage
        self.outage = False

    def should_cancel(self) -> bool:
        if os.getppid() != self.parent:  # orphaned: the supervisor is gone
            return True
        try:
            with self.Session() as session:
                return crud.is_active(session, self.job_id, self.attempt) != RUNNING
        except OUTAGE:
            return False  # no answer is not a cancellation; the supervisor minds the lease

    def emit(self, event: Event) -> None:
        self.pending.append(event)
        self.flush()

    def flush(self, seconds: float = 0.0) -> bool:
        """Write the waiting events in order, retrying through an outage for up to `seconds`;
        True when none is left."""
        while self.pending:
            try:
                through_outage(lambda: self._write(self.pending[0]), seconds)
            except OUTAGE:
                if not self.outage:
                    log.warning("the database does not answer; %d event(s) wait to be written", len(self.pending))
                self.outage = True
                return False
            self.pending.popleft()
        self.outage = False
        return True

    def _write(self, event: Event) -> None:
        with self.Session() as session:
            if crud.is_active(session, self.job_id, self.attempt) is None:
                return
            getattr(self, f"_on_{event.type}")(session, event)

    # -- one method per event type --------------------------------------------------------------

    def _on_state(self, session, event: Event) -> None:
        state = event.data.get("state")
        if state in (SUCCEEDED, CANCELLED, FAILED):
            crud.finish(session, self.job_id, self.attempt, state, event.data.get("error"), event.message)
        else:
            crud.add_event(session, self.job_id, "log", event.message, event.level, event.data)

    def _on_log(self, session, event: Event) -> None:
        crud.add_event(session, self.job_id, "log", event.message, event.level, event.data)

    def _on_progress(self, session, event: Event) -> None:
        job = session.get(Job, self.job_id)
        job.step, job.total_steps = event.data["step"], event.data["total_steps"]
        job.eta_seconds = event.data.get("eta_seconds")
        session.commit()

    def _on_metrics(self, session, event: Event) -> None:
        step, values = event.data["step"], event.data["values"]
        session.add_all(Metric(job_id=self.job_id, step=step, name=k, value=float(v)) for k, v in values.items())
        session.get(Job, self.job_id).latest_metrics = {"step": step, "stage": event.data.get("stage"), **values}
        crud.add_event(session, self.job_id, "metrics", "", "debug", event.data)

    def _on_eval(self, session, event: Event) -> None:
        step, label, scores = event.data["step"], event.data["label"], event.data["scores"]
        session.add(EvalResult(job_id=self.job_id, step=step, label=label, scores=scores))
        if label == "best":  # the best checkpoint's test-set scores, at the end of the job
            session.get(Job, self.job_id).best_eval = {"step": step, "set": "test", "scores": scores}
        crud.add_event(session, self.job_id, "eval", event.message, "info", event.data)

    def _on_checkpoint(self, session, event: Event) -> None:
        step, directory = event.data["step"], Path(event.data["path"])
        if not directory.exists():  # written late (after an outage): the engine has already replaced it
            crud.add_event(session, self.job_id, "checkpoint", event.message + " (since replaced by a newer one)", "info", event.data)
            return
        archive = directory.parent.parent / "archives" / f"{directory.name}.tar"
        archive.parent.mkdir(exist_ok=True)
        build_archive(directory, archive)
        files = [{"name": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(directory.iterdir())]
        storage_url = None
        if self.store is not None:
            storage_url = self.store.job_url(self.job_id)
            self.store.upload(storage_url, f"archives/{archive.name}", archive)
            for f in files:
                self.store.upload(storage_url, f"checkpoints/{directory.name}/{f['name']}", directory / f["name"])
        session.execute(delete(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.step == step))
        session.add(Checkpoint(
            job_id=self.job_id, step=step, path=str(directory), archive_path=str(archive),
            archive_size=archive.stat().st_size, archive_sha256=sha256_file(archive), files=files,
            scores=event.data.get("scores"), storage_url=storage_url,
        ))  # fmt: skip
        job = session.get(Job, self.job_id)
        # The engine chose this checkpoint as the best so far (by its selection-set scores); once the
        # test set has scored it, those scores stand.
        if event.data.get("best") and not (job.best_eval and job.best_eval["step"] == step and job.best_eval.get("set") == "test"):
            job.best_eval = {"step": step, "set": "selection", "scores": event.data["scores"]}
        # The engine keeps only the newest checkpoints (and the best): forget those it removed.
        for old in session.scalars(select(Checkpoint).where(Checkpoint.job_id == self.job_id)).all():
            if not Path(old.path).exists():
                Path(old.archive_path).unlink(missing_ok=True)
                if old.storage_url and self.store is not None:
                    name = Path(old.path).name
                    self.store.delete(old.storage_url, [f"archives/{name}.tar", *(f"checkpoints/{name}/{f['name']}" for f in old.files)])
                session.delete(old)
        crud.add_event(session, self.job_id, "checkpoint", event.message, "info", {**event.data, "files": files})
