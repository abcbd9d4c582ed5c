"""The Celery application. Settings fit multi-hour GPU tasks:

- late ack and prefetch 1: a worker reserves only the job it runs, and a job whose worker dies is
  not lost;
- a visibility timeout above the longest job, so Redis does not hand a running job to a second
  worker; a duplicate that arrives anyway is recognised when it tries to claim the job row;
- JSON only, results ignored: the database, not the result backend, is the record of a job.

Queues are resource classes (`cpu-1`, `gpu-4`, ...): a worker consumes only the classes it can run.
"""

from __future__ import annotations

from celery import Celery

from app.core.config import Settings, get_settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("distill", broker=settings.resolved_broker_url, include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        # Redis only: the SQLAlchemy transport hands its options to create_engine.
        broker_transport_options=(
            {"visibility_timeout": settings.visibility_timeout_seconds} if settings.resolved_broker_url.startswith("redis") else {}
        ),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_default_queue="cpu-1",
    )
    return app


def queue_for(spec: dict, settings: Settings) -> str:
    """The resource class of a job: accelerator kind and number of devices."""
    resources = spec.get("resources", {})
    kind = resources.get("accelerator", "auto")
    if kind == "auto":
        kind = settings.auto_accelerator
    return f"{kind}-{resources.get('devices', 1)}"


celery = make_celery(get_settings())
