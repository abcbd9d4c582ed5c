"""The broker as the service uses it: which queue a job goes to, and sending it there by task name.

The API sends `distill.run_job` by name with a Celery app that knows only the broker, so it never
imports the worker's task code (nor, through it, the supervisor and the engine). Workers build their
own app from the same settings, with the task in it (`worker/celery_app.py`).

Settings fit multi-hour GPU tasks:
- late ack and prefetch 1: a worker reserves only the job it runs, and a job whose worker dies is
  not lost;
- a visibility timeout above the longest job, so Redis does not hand a running job to a second
  worker; a duplicate that arrives anyway is recognised when it tries to claim the job row;
- JSON only, results ignored: the database, not the result backend, is the record of a job.

Queues are resource classes (`cpu-1`, `gpu-4`, `auto-2`, ...): a worker consumes only the classes it
can run (`worker.device_leases.Inventory.queues`).
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from app.core.config import Settings, get_settings

RUN_JOB = "distill.run_job"


def configure(app: Celery, settings: Settings) -> Celery:
    app.conf.update(
        broker_url=settings.resolved_broker_url,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        # Redis only: the SQLAlchemy transport hands its options to create_engine.
        broker_transport_options=(
            {"visibility_timeout": settings.visibility_timeout_seconds}
            if settings.resolved_broker_url.startswith("redis")
            else {}
        ),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_default_queue="cpu-1",
    )
    return app


@lru_cache
def broker() -> Celery:
    """The service's connection to the broker (no tasks of its own)."""
    return configure(Celery("distill", set_as_current=False), get_settings())


def queue_for(spec: dict, served: set[str]) -> str:
    """The resource class of a job: accelerator kind and number of devices. An `auto` job goes to a
    GPU queue that a live worker serves (`served`), and otherwise to `auto-N`, which GPU and CPU
    workers all consume: it runs wherever it can, on whichever worker is first free."""
    resources = spec.get("resources", {})
    kind, devices = resources.get("accelerator", "auto"), resources.get("devices", 1)
    if kind == "auto":
        kind = "gpu" if f"gpu-{devices}" in served else "auto"
    return f"{kind}-{devices}"


def send_job(job_id: str, queue: str) -> None:
    """Put a job's message on its queue; raises whatever the broker client raises if it cannot."""
    broker().send_task(RUN_JOB, args=[job_id], queue=queue)
