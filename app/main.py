"""The API server: `uvicorn app.main:app` (or `distill up`, which also runs a worker)."""

from __future__ import annotations

import re
import threading
import time
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.routing import compile_path

from app.api import errors
from app.api.routes import datasets, health, jobs, me
from app.api.routes.health import REQUEST_SECONDS
from app.core.body_limit import BodyLimit
from app.core.fair_share import FairShare
from app.core.headers import SecurityHeaders
from app.reaper import reap_forever


@asynccontextmanager
async def lifespan(_app: FastAPI):
    # Jobs whose worker died are taken up again (or failed) even when no worker is left to notice.
    stop = threading.Event()
    thread = threading.Thread(target=reap_forever, args=(stop,), daemon=True, name="reaper")
    thread.start()
    yield
    stop.set()


def operation_id(route: APIRoute) -> str:
    """`{tag}_{name}` (jobs_create, datasets_upload): short, and stable as long as the route's name is,
    where FastAPI's default spells out the path and method; generated clients name their methods
    after it. A route's name is its function's unless the route sets `name=`; a route without a tag
    (the web page's, outside the description) is its name alone."""
    return "_".join([*route.tags[:1], route.name])


app = FastAPI(
    title="distill",
    version="0.1.0",
    lifespan=lifespan,
    generate_unique_id_function=operation_id,
    description="Knowledge distillation of large language models with MiniLLM, as a service.",
)
errors.install(app)


def openapi() -> dict:
    """FastAPI's description, with two things FastAPI gets wrong put right. It describes an event
    stream's events with `itemSchema`, an OpenAPI 3.2 keyword that 3.1 (and the client generators
    reading it) refuse: here it is the stream's `schema`, which tools for 3.1 (schemathesis among
    them) read as each event's. And it files the errors a route declares under the route's own
    media type (an event stream, plain text), where they are JSON."""
    schema = FastAPI.openapi(app)  # built once, then cached on app.openapi_schema
    for path in schema["paths"].values():
        for operation in path.values():
            for status_code, response in operation["responses"].items():
                content = response.get("content", {})
                if "itemSchema" in content.get("text/event-stream", {}):
                    content["text/event-stream"] = {"schema": content["text/event-stream"]["itemSchema"]}
                if status_code.startswith("4") and len(content) == 1 and "application/json" not in content:
                    response["content"] = {"application/json": content.popitem()[1]}
    return schema


app.openapi = openapi


api = APIRouter(prefix="/api/v1")
api.include_router(jobs.router)
api.include_router(datasets.router)
api.include_router(me.router)
app.include_router(api)
app.include_router(health.router)
# A job spec is a few KB; 1 MiB bounds what is parsed in memory. Dataset uploads stream to disk
# under DISTILL_MAX_UPLOAD_BYTES instead.
MAX_BODY_BYTES = 1024 * 1024
UPLOAD = ("POST", "/api/v1/datasets")
app.add_middleware(FairShare, exempt=(UPLOAD,))
app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, exempt=(UPLOAD,))
app.add_middleware(SecurityHeaders)

# The web page (frontend/): index.html at /, its own code under /static, the pinned libraries that
# `make install` fetched under /vendor. Registered after the API, so API routes always match first.
FRONTEND = Path(__file__).resolve().parent.parent / "frontend"


@app.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(FRONTEND / "index.html", headers={"Cache-Control": "no-cache"})


app.mount("/static", StaticFiles(directory=FRONTEND / "static", check_dir=False), name="static")
app.mount("/vendor", StaticFiles(directory=FRONTEND / "vendor", check_dir=False), name="vendor")


@lru_cache
def _route_templates() -> list[tuple[re.Pattern, str]]:
    """Full path templates (/api/v1/jobs/{job_id}), so that latency is labelled per route, not per URL."""
    paths = [*app.openapi()["paths"], "/metrics"]
    return [(compile_path(path)[0], path) for path in paths]


@app.middleware("http")
async def record_latency(request: Request, call_next):
    started = time.perf_counter()
    response = await call_next(request)
    path = request.scope["path"]
    route = next((template for regex, template in _route_templates() if regex.match(path)), "unmatched")
    REQUEST_SECONDS.labels(request.method, route, response.status_code).observe(time.perf_counter() - started)
    return response
