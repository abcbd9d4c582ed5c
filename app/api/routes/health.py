"""Liveness, readiness and Prometheus metrics (no authentication: for load balancers and scrapers)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import text

from app import crud
from app.core.broker import broker
from app.core.db import session_factory
from app.models import JobStatus
from app.schemas import Health, Readiness

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)
registry = CollectorRegistry()
REQUEST_SECONDS = Histogram(
    "distill_http_request_seconds", "API request latency", ["method", "route", "status"], registry=registry
)


class JobCollector:
    """Read at scrape time from the database, the record every API replica shares."""

    def collect(self):
        by_status = GaugeMetricFamily("distill_jobs", "Jobs by status", labels=["status"])
        depth = GaugeMetricFamily("distill_queue_depth", "Jobs waiting for a worker, by queue", labels=["queue"])
        with session_factory()() as session:
            counts, queued = crud.jobs_by_status(session), crud.queue_depths(session)
        for name in JobStatus:
            by_status.add_metric([name], counts.get(name, 0))
        for queue, count in queued.items():
            depth.add_metric([queue], count)
        yield by_status
        yield depth


registry.register(JobCollector())


@router.get("/healthz")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz", responses={503: {"model": Readiness, "description": "The database or the broker does not answer."}}
)
def readyz(response: Response) -> Readiness:
    """Ready when the database and the broker answer. The answer says which one is down, not why:
    anyone may ask, and a driver's error names hosts, users and databases. The log has the error."""
    checks = {}
    try:
        with session_factory()() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception:  # any driver error means not ready
        log.warning("readiness: the database does not answer", exc_info=True)
        checks["database"] = "unavailable"
    try:
        with broker().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
        checks["broker"] = "ok"
    except Exception:
        log.warning("readiness: the broker does not answer", exc_info=True)
        checks["broker"] = "unavailable"
    if any(v != "ok" for v in checks.values()):
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(**checks)


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
