"""Supervise one attempt of a job: lease its devices, claim it, run the engine in a child process,
heartbeat, enforce cancellation, and make sure the job never stays `running` after its process is
gone, nor holds its devices after it ended.

The training process is a child in its own process group, never the Celery process itself: torch,
CUDA and DeepSpeed state stay out of the worker, a crash or an out-of-memory kill takes only the
child, and cancelling can signal the whole group (the DeepSpeed launcher and its ranks).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from app import job_status
from app.core.config import Settings, get_settings
from app.core.db import session_factory
from app.core.outage import OUTAGE, through_outage
from app.core.storage import s3_store
from app.job_paths import hide_server_paths, job_dir
from app.models import CANCELLED, CANCELLING, FAILED, QUEUED, Dataset, Job
from app.outbox import publish
from app.worker_registry import worker_name
from worker import device_leases
from worker.device_leases import Inventory, inventory
from worker.engine.launch import deepspeed_command
from worker.job_state import bring_datasets, restore
from worker.node_group import HostfileError, free_port_on, launcher_options, read_hostfile, write_rank_environment

PR_SET_PDEATHSIG = 1
logger = logging.getLogger(__name__)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so that no training process outlives
    a killed worker and races the attempt that takes its job over."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def child_command(
    job_id: str,
    attempt: int,
    spec: dict,
    settings: Settings,
    devices: list[int] | None = None,
    master_port: int | None = None,
) -> list[str]:
    """The training process: alone for one device, else under the DeepSpeed launcher, on the leased
    `devices` of this machine, or across the first machines of the node group (`master_port`: the
    rendezvous port, free on its first host)."""
    entry = ["worker.job_process", job_id, "--attempt", str(attempt)]
    count = spec.get("resources", {}).get("devices", 1)
    if count == 1:
        return [sys.executable, "-m", *entry]
    if master_port is not None:
        hosts = read_hostfile(settings.hostfile)
        return deepspeed_command(
            entry, ["--hostfile", str(settings.hostfile), *launcher_options(hosts, count, master_port)]
        )
    return deepspeed_command(entry, ["--include", "localhost:" + ",".join(map(str, devices))])


def child_environment(devices: list[int] | None, inventory: Inventory, settings: Settings) -> dict[str, str]:
    """The worker's environment with the leased devices made the training process's. One process
    gets its GPU as CUDA_VISIBLE_DEVICES (a CPU worker's gets none, so an `auto` job it took stays on
    the CPU); the launcher sets each rank's from `--include`, after checking the ordinals against the
    host's device count, which its CPU accelerator reads from LOCAL_SIZE.

    A training process stopped or hung inside a transaction would hold its job's row lock, and this
    supervisor's heartbeats, the reaper and cancels, which need the row, would wait with it: PostgreSQL
    closes such a session after half the heartbeat timeout (libpq reads PGOPTIONS; SQLite ignores it)."""
    env = dict(os.environ)
    # The engine reads no service settings of its own.
    env.update(DISTILL_HUB_MAX_GB=str(settings.hub_max_gb), DISTILL_TRACKERS=settings.trackers)
    idle = f"-c idle_in_transaction_session_timeout={int(settings.heartbeat_timeout_seconds * 500)}"
    env["PGOPTIONS"] = f"{env['PGOPTIONS']} {idle}" if env.get("PGOPTIONS") else idle
    if devices is None:
        return env
    if len(devices) == 1:
        env["CUDA_VISIBLE_DEVICES"] = str(devices[0]) if inventory.kind == "gpu" else ""
    else:
        env["LOCAL_SIZE"] = str(inventory.count)
    return env


def describe_exit(code: int, log: Path) -> dict:
    if code < 0:
        name = signal.Signals(-code).name
        message = f"the training process was killed by {name}"
        if code == -signal.SIGKILL:
            message += " (often the kernel's out-of-memory killer: try a smaller batch, ZeRO 2-3 or offload)"
    else:
        message = f"the training process exited with code {code}"
    tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
    return {"code": "ProcessExited", "message": message + ("; last output: " + " | ".join(tail) if tail else "")}


def supervise(job_id: str) -> bool:
    """Run one attempt of `job_id` on devices leased for it. False if the job was not ours to run."""
    settings = get_settings()
    Session = session_factory()
    devices_here, name = inventory(settings), worker_name()
    with Session() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != QUEUED:
            return False
        spec, queue = job.spec, job.queue
    count = spec.get("resources", {}).get("devices", 1)
    spread = count > devices_here.count and count in devices_here.group_sizes  # its ranks run on the group's machines
    if not spread and count > devices_here.count:  # only a worker given --queues of sizes it lacks gets here
        with Session() as session:
            attempt = job_status.claim(session, job_id, worker=name)
            if attempt is not None:
                message = f"asks for {count} devices; worker {name} has {devices_here.count} ({devices_here.kind})"
                job_status.finish(
                    session,
                    job_id,
                    attempt,
                    FAILED,
                    {"code": "ResourceError", "message": f"resources.devices: {message}"},
                )
        return attempt is not None
    # A job across the group takes every device of this machine, its first: nothing else runs beside its ranks.
    devices = _lease(job_id, devices_here.count if spread else count, devices_here, name, settings, Session)
    if devices is None:
        return False
    try:
        with Session() as session:
            placement = {"kind": devices_here.kind, "devices": devices}
            if spread:
                hosts = read_hostfile(settings.hostfile)
                placement["hosts"] = [h.name for h in hosts[: count // hosts[0].slots]]
            attempt = job_status.claim(session, job_id, worker=name, placement=placement)
        if attempt is None:
            return False
        # A job across the group gets no device variables: each machine's launcher sets its ranks' own.
        env = child_environment(None if spread else devices, devices_here, settings)
        try:
            port = _prepare_group_launch(settings, job_id, attempt, env) if spread else None
        except HostfileError as err:  # a machine of the group does not answer: worth another attempt
            with Session() as session:
                if job_status.retry_or_fail(session, job_id, attempt, {"code": "NodeGroupError", "message": str(err)}):
                    publish(job_id, queue)
            return True
        command = child_command(job_id, attempt, spec, settings, devices, port)
        _bring_from_bucket(job_id, spec, settings, Session)
        try:
            _run(job_id, attempt, spec, queue, settings, Session, command, env)
        finally:
            if "DS_ENV_FILE" in env:  # the ranks' settings (secrets among them) do not outlive the attempt
                Path(env["DS_ENV_FILE"]).unlink(missing_ok=True)
        return True
    finally:
        through_outage(lambda: _release(job_id, name, Session), settings.heartbeat_timeout_seconds)


def _prepare_group_launch(settings: Settings, job_id: str, attempt: int, env: dict[str, str]) -> int:
    """For a job across the node group: the rendezvous port, free on the group's first host, where
    rank 0 listens; and the settings every rank (started over ssh) needs, in a file of this attempt."""
    folder = job_dir(settings, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    env["DS_ENV_FILE"] = str(write_rank_environment(env, folder / f"attempt-{attempt}.env"))
    return free_port_on(read_hostfile(settings.hostfile)[0].name)


LEASE_POLL_SECONDS = 2.0


def _lease(
    job_id: str, count: int, devices_here: Inventory, worker: str, settings: Settings, Session
) -> list[int] | None:
    """Wait until `count` devices of this machine are free and lease them to the job for `worker`; None once the
    job has left the queue meanwhile (cancelled, or taken by another worker)."""
    liveness = timedelta(seconds=settings.heartbeat_timeout_seconds)
    while True:
        try:
            with Session() as session:
                devices = device_leases.acquire(session, job_id, count, devices_here, worker, liveness)
                if devices is not None or session.scalar(select(Job.status).where(Job.id == job_id)) != QUEUED:
                    return devices
        except OUTAGE:
            pass
        time.sleep(LEASE_POLL_SECONDS)


def _release(job_id: str, worker: str, Session) -> None:
    with Session() as session:
        device_leases.release(session, job_id, worker)


def _bring_from_bucket(job_id: str, spec: dict, settings: Settings, Session) -> None:
    """With a bucket: the job's resume state and kept checkpoints, and the uploaded datasets its spec
    reads, where this machine does not have them. Without the bucket's copies the job resumes from what
    is here (and a missing upload fails it, naming the field)."""
    if (store := s3_store()) is None:
        return
    refs = spec.get("data", {}).values()
    ids = [ref.removeprefix("dataset:") for ref in refs if isinstance(ref, str) and ref.startswith("dataset:")]
    try:
        restore(store, job_id, job_dir(settings, job_id))
        with Session() as session:
            datasets = session.scalars(select(Dataset).where(Dataset.id.in_(ids))).all()
        bring_datasets(store, datasets, settings)
    except Exception:  # boto3 raises many types
        logger.warning("job %s: could not bring its state or datasets from the bucket", job_id, exc_info=True)


def _run(
    job_id: str,
    attempt: int,
    spec: dict,
    queue: str,
    settings: Settings,
    Session,
    command: list[str],
    env: dict[str, str],
) -> None:
    """Run the attempt's training process to its end and settle the job's status (back to `queue`
    when the processes stopped without an outcome and attempts remain)."""
    out = job_dir(settings, job_id)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"attempt-{attempt}.log"
    with log.open("w") as log_file:
        child = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            ended = _watch(child, job_id, attempt, settings, Session, run_minutes(spec, settings))
        finally:
            if child.poll() is None:  # _watch failed unexpectedly: no training process outlives its supervisor
                _stop(child)
    code = child.wait()
    if ended == OUTAGE_STOP:
        return  # the lease ran out in a database outage: the reaper queues the job again

    def settle() -> bool:
        """True if the job was queued again."""
        with Session() as session:
            status = job_status.is_active(session, job_id, attempt)
            if status == CANCELLING:  # killed after the grace period, or stopped without saying so
                job_status.finish(
                    session, job_id, attempt, CANCELLED, message="cancelled: the worker stopped the training process"
                )
            elif status is not None and ended == TIMED_OUT:  # not retried: the next attempt would run as long
                minutes = run_minutes(spec, settings)
                job_status.finish(
                    session,
                    job_id,
                    attempt,
                    FAILED,
                    {"code": "TimeLimit", "message": f"ran for {minutes:g} minutes, its limit: the worker stopped it"},
                )
            elif status is not None:  # it ended without reporting an outcome: killed, crashed, a rank lost, or stalled
                error = hide_server_paths(describe_exit(code, log), settings, job_id)
                if ended == STALLED:
                    error = {
                        "code": "NoProgress",
                        "message": f"no step and no event for {settings.progress_timeout_seconds:.0f} s: "
                        f"the worker stopped the training process",
                    }
                return job_status.retry_or_fail(session, job_id, attempt, error)
        return False

    if through_outage(settle, settings.heartbeat_timeout_seconds):
        publish(job_id, queue)  # if the broker is down, the reaper sends it later


# Why `_watch` stopped watching.
ENDED = "ended"  # the child ended, or was stopped because the job was cancelled or taken over
OUTAGE_STOP = "outage"  # stopped because the database stayed unreachable until just before the lease ends
STALLED = "stalled"  # stopped because it made no progress for progress_timeout_seconds
TIMED_OUT = "timed out"  # stopped because the attempt ran past run_minutes


def run_minutes(spec: dict, settings: Settings) -> float:
    """How long an attempt may run: the spec's resources.max_run_minutes, within the operator's cap."""
    asked = spec.get("resources", {}).get("max_run_minutes")
    return min(asked or settings.max_run_minutes, settings.max_run_minutes)


def _watch(child: subprocess.Popen, job_id: str, attempt: int, settings: Settings, Session, minutes: float) -> str:
    """Heartbeat while the child runs; stop it if the job is taken over, cancelled and still running
    after the grace period (the child stops by itself between any two units of work), silent (no
    step, no event) for `progress_timeout_seconds`, or running for more than `minutes`. OUTAGE_STOP
    when the database stayed unreachable until just before the lease ends (the reaper may then give the
    job to another attempt, which must not run beside it)."""
    last_beat, last_answer, cancel_seen = 0.0, time.monotonic(), None
    last_progress, progressed_at = None, time.monotonic()
    deadline = time.monotonic() + 60 * minutes
    while child.poll() is None:
        time.sleep(0.5)
        now = time.monotonic()
        if cancel_seen is not None and now - cancel_seen > settings.cancel_grace_seconds:
            _stop(child)
            return ENDED
        if now > deadline:
            logger.warning("job %s: ran past its %g minutes; stopping its training process", job_id, minutes)
            _stop(child)
            return TIMED_OUT
        if now - last_beat < settings.heartbeat_seconds:
            continue
        last_beat = now
        try:
            with Session() as session:
                owned = job_status.heartbeat(session, job_id, attempt)
                status = job_status.is_active(session, job_id, attempt)
                progress = job_status.progress(session, job_id)
        except OUTAGE:
            if now - last_answer > settings.heartbeat_timeout_seconds - 2 * settings.heartbeat_seconds:
                logger.warning(
                    "job %s: the database did not answer for %.0f s; stopping its training process "
                    "before its lease ends",
                    job_id,
                    now - last_answer,
                )
                _stop(child)
                return OUTAGE_STOP
            continue
        last_answer = now
        if not owned:
            _stop(child)  # another attempt has the job now; this one must not write anything more
            return ENDED
        if status == CANCELLING and cancel_seen is None:
            cancel_seen = now
        if progress != last_progress:
            last_progress, progressed_at = progress, now
        elif settings.progress_timeout_seconds is not None and now - progressed_at > settings.progress_timeout_seconds:
            logger.warning("job %s: no progress for %.0f s; killing its training process", job_id, now - progressed_at)
            _stop(child, grace=1.0)  # hung: it would not stop by itself, and the heartbeats wait meanwhile
            return STALLED
    return ENDED


def _stop(child: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
