"""The engine's reporter inside the service: every event goes to the database as it happens, from a
writer thread (the training loop does not wait for it).

Writes are fenced by the attempt number, atomically: each event's rows are written in the
transaction that locked the job's row while this attempt owned it (`job_status.hold`). Once the job
belongs to another attempt (its worker was presumed lost and the job was taken up again) or has
ended, this process writes nothing more and is asked to stop. Paths in what users read are
relative to the job's folder (`job_paths.hide_server_paths`).
"""

from __future__ import annotations

import logging
import math
import os
import tarfile
import threading
from collections import deque
from pathlib import Path

from sqlalchemy import delete, select

from app import crud, job_status
from app.core.config import get_settings
from app.core.db import session_factory
from app.core.outage import OUTAGE, through_outage
from app.core.storage import s3_store
from app.job_paths import hide_server_paths, job_dir
from app.models import CANCELLED, FAILED, RUNNING, SUCCEEDED, Checkpoint, EvalResult, Job
from distill_client.api import sha256_file
from worker.engine.events import Event
from worker.engine.paths import RESUME_STATE_FILE

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
    """Events are written in order by a thread of their own: the training loop never waits on the
    database, a bucket upload or a checkpoint's archive and hashes (on rank 0, while the other ranks
    would wait for it in their next collective). Through a database outage the writer retries and the
    events wait, in memory, in order."""

    def __init__(self, job_id: str, attempt: int):
        self.job_id, self.attempt = job_id, attempt
        self.Session = session_factory()
        self.settings = get_settings()
        self.parent = os.getppid()
        self.store = s3_store()
        self.pending: deque[Event] = deque()  # the first is being written; emptied in order
        self.changed = threading.Condition()
        threading.Thread(target=self._write_forever, daemon=True, name="event-writer").start()

    def should_cancel(self) -> bool:
        if os.getppid() != self.parent:  # orphaned: the supervisor is gone
            return True
        try:
            with self.Session() as session:
                return job_status.is_active(session, self.job_id, self.attempt) != RUNNING
        except OUTAGE:
            return False  # no answer is not a cancellation; the supervisor minds the lease

    def emit(self, event: Event) -> None:
        with self.changed:
            self.pending.append(event)
            self.changed.notify_all()

    def flush(self, seconds: float) -> bool:
        """Wait up to `seconds` for the events emitted so far to be written; True when none is left."""
        with self.changed:
            return self.changed.wait_for(lambda: not self.pending, timeout=seconds)

    def _write_forever(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.pending)
                event = self.pending[0]
            try:
                through_outage(lambda: self._write(event), seconds=math.inf)
            except Exception:  # not an outage, which is waited out: a bug, or a checkpoint's files removed meanwhile
                log.exception("job %s: its %s event could not be written", self.job_id, event.type)
            with self.changed:
                self.pending.popleft()
                self.changed.notify_all()

    def _write(self, event: Event) -> None:
        # Slow file and bucket work happens outside the transaction that holds the job's row lock:
        # archives are built before it, files of forgotten checkpoints deleted after it commits.
        built = self._archive(event) if event.type == "checkpoint" else None
        doomed: list[tuple[dict, dict | None]] = []
        with self.Session() as session:
            if job_status.hold(session, self.job_id, self.attempt) is None:
                session.rollback()
                if built is not None:  # this attempt no longer owns the job: nothing of it stays
                    Path(built["archive_path"]).unlink(missing_ok=True)
                return
            if event.type == "checkpoint":
                self._on_checkpoint(session, event, built, doomed)
            else:
                getattr(self, f"_on_{event.type}")(session, event)
        for files, replaced_by in doomed:
            self._delete_files(files, replaced_by)

    def _event(self, session, type_: str, message: str, level: str, data: dict) -> None:
        crud.add_event(session, self.job_id, type_, self._hide(message), level, self._hide(data))

    def _hide(self, value):
        return hide_server_paths(value, self.settings, self.job_id)

    # -- one method per event type --------------------------------------------------------------

    def _on_state(self, session, event: Event) -> None:
        state = event.data.get("state")
        if state in (SUCCEEDED, CANCELLED, FAILED):
            job_status.finish(
                session,
                self.job_id,
                self.attempt,
                state,
                self._hide(event.data.get("error")),
                self._hide(event.message),
            )
        else:
            self._event(session, "log", event.message, event.level, event.data)

    def _on_log(self, session, event: Event) -> None:
        self._event(session, "log", event.message, event.level, event.data)

    def _on_progress(self, session, event: Event) -> None:
        job = session.get(Job, self.job_id)
        job.step, job.total_steps = event.data["step"], event.data["total_steps"]
        job.eta_seconds = event.data.get("eta_seconds")
        session.commit()

    def _on_metrics(self, session, event: Event) -> None:
        # The one copy of a step's metrics (with its stage), which the event stream carries and the
        # metrics API reads (crud.metric_series).
        self._event(session, "metrics", "", "debug", event.data)

    def _on_eval(self, session, event: Event) -> None:
        step, label, scores = event.data["step"], event.data["label"], event.data["scores"]
        session.execute(
            delete(EvalResult).where(
                EvalResult.job_id == self.job_id, EvalResult.step == step, EvalResult.label == label
            )
        )
        # Hidden as the eval event's copy is, so that the samples API and the event log show the same text.
        samples = self._hide(event.data["samples"])
        session.add(EvalResult(job_id=self.job_id, step=step, label=label, scores=scores, samples=samples))
        if label == "best":  # the best checkpoint's test-set scores, at the end of the job
            session.get(Job, self.job_id).best_eval = {"step": step, "set": "test", "scores": scores}
        self._event(session, "eval", event.message, "info", event.data)

    def _archive(self, event: Event) -> dict | None:
        """The Checkpoint row's file columns for a checkpoint's directory, archived and uploaded; None if the
        engine has already replaced the checkpoint (its event is written late, after an outage, or behind
        a slow upload). The archive's name carries the attempt: a stale attempt never overwrites the
        current one's."""
        directory = Path(event.data["path"])
        archive = directory.parent.parent / "archives" / f"{directory.name}-attempt-{self.attempt}.tar"
        uploaded_to: list[str] = []  # the bucket URL, once this attempt has begun to upload
        try:
            return self._build_and_upload(directory, archive, uploaded_to)
        except FileNotFoundError:
            # The engine pruned this checkpoint (a newer one was saved) while it was archived or
            # uploaded: nothing of it stays, here or in the bucket, where no row would ever point at it.
            archive.unlink(missing_ok=True)
            if uploaded_to:
                (url,) = uploaded_to
                prefixes = (f"archives/{archive.name}", f"checkpoints/{directory.name}/", f"resume/{directory.name}/")
                self.store.delete(url, [n for p in prefixes for n in self.store.names(url, p)])
            return None

    def _build_and_upload(self, directory: Path, archive: Path, uploaded_to: list[str]) -> dict:
        if not directory.exists():
            raise FileNotFoundError(directory)
        archive.parent.mkdir(exist_ok=True)
        build_archive(directory, archive)
        files = [
            {"name": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(directory.iterdir())
        ]
        storage_url = None
        # A stale attempt must not overwrite the current one's objects in the bucket (the checkpoint's
        # keys are per step): upload only while this attempt owns the job.
        if self.store is not None and self._owns():
            storage_url = self.store.job_url(self.job_id)
            uploaded_to.append(storage_url)
            self.store.upload(storage_url, f"archives/{archive.name}", archive)
            for f in files:
                self.store.upload(storage_url, f"checkpoints/{directory.name}/{f['name']}", directory / f["name"])
            # The state to resume from this step, for an attempt on another machine (worker/job_state.py).
            resume = directory.parent.parent / "resume" / directory.name
            if (resume / RESUME_STATE_FILE).exists():
                self.store.upload_tree(storage_url, f"resume/{directory.name}/", resume, last=RESUME_STATE_FILE)
                older = [
                    n for n in self.store.names(storage_url, "resume/") if not n.startswith(f"resume/{directory.name}/")
                ]
                self.store.delete(storage_url, older)
        return dict(
            path=str(directory),
            archive_path=str(archive),
            archive_size=archive.stat().st_size,
            archive_sha256=sha256_file(archive),
            files=files,
            storage_url=storage_url,
        )

    def _owns(self) -> bool:
        with self.Session() as session:
            return job_status.is_active(session, self.job_id, self.attempt) is not None

    def _on_checkpoint(self, session, event: Event, built: dict | None, doomed: list) -> None:
        step = event.data["step"]
        if built is None:
            self._event(session, "checkpoint", event.message + " (since replaced by a newer one)", "info", event.data)
            return
        # The same step written again (by an attempt that resumed before it): the new one replaces it.
        for same in session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.step == step)
        ).all():
            doomed.append((_file_columns(same), built))
            session.delete(same)
        session.flush()  # the old row of this step is gone before the new one is inserted
        session.add(Checkpoint(job_id=self.job_id, step=step, scores=event.data.get("scores"), **built))
        job = session.get(Job, self.job_id)
        # The engine chose this checkpoint as the best so far (by its selection-set scores); once the
        # test set has scored it, those scores stand.
        if event.data.get("best") and not (
            job.best_eval and job.best_eval["step"] == step and job.best_eval.get("set") == "test"
        ):
            job.best_eval = {"step": step, "set": "selection", "scores": event.data["scores"]}
        # The engine keeps only the newest checkpoints (and the best): forget those it removed.
        # (Looked for in this attempt's folder: an attempt on another machine brought those it keeps.)
        kept = job_dir(self.settings, self.job_id) / "checkpoints"
        for old in session.scalars(select(Checkpoint).where(Checkpoint.job_id == self.job_id)).all():
            if not Path(old.path).exists() and not (kept / Path(old.path).name).exists():
                doomed.append((_file_columns(old), None))
                session.delete(old)
        self._event(session, "checkpoint", event.message, "info", {**event.data, "files": built["files"]})

    def _delete_files(self, checkpoint: dict, replaced_by: dict | None) -> None:
        """Delete the files of a checkpoint whose row is gone (its `_file_columns`); where `replaced_by`
        (the new row of the same step) reuses their names, only the old archive, if its name differs."""
        keys = []
        if replaced_by is None or replaced_by["archive_path"] != checkpoint["archive_path"]:
            Path(checkpoint["archive_path"]).unlink(missing_ok=True)
            keys.append(f"archives/{Path(checkpoint['archive_path']).name}")
        if replaced_by is None:
            keys += [f"checkpoints/{Path(checkpoint['path']).name}/{f['name']}" for f in checkpoint["files"]]
        if checkpoint["storage_url"] and self.store is not None:
            self.store.delete(checkpoint["storage_url"], keys)


def _file_columns(checkpoint: Checkpoint) -> dict:
    """What deleting a checkpoint's files needs, read while its row is still loaded."""
    return {k: getattr(checkpoint, k) for k in ("path", "archive_path", "files", "storage_url")}
