"""Liveness and readiness (no authentication: for load balancers) and Prometheus metrics (for a scraper
with the operator's token, or on this machine)."""

from __future__ import annotations

import hmac
import ipaddress
import logging
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import text

from app import crud
from app.api.deps import SettingsDep
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
async def healthz() -> Health:
    """Answered on the event loop: a liveness probe must not wait for a thread behind a burst of
    requests (sync routes share 40 threads), or a busy API would be restarted as a dead one."""
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


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # not an address (a test client's name)
        return False


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> Response:
    """Every tenant's job counts and queue depths: for the operator's scraper (DISTILL_METRICS_TOKEN as
    its bearer token), not for whoever can reach the API; with no token set, for this machine only."""
    token = settings.metrics_token
    if token is not None:
        expected = f"Bearer {token.get_secret_value()}"
        if not hmac.compare_digest((authorization or "").encode(), expected.encode()):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "GET /metrics needs the operator's metrics token")
    elif request.client is None or not _loopback(request.client.host):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "GET /metrics answers this machine only (DISTILL_METRICS_TOKEN is not set)"
        )
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
