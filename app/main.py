"""The API server: `uvicorn app.main:app` (or `distill up`, which also runs a worker)."""

from __future__ import annotations

import math
import re
import threading
import time
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.routing import compile_path

from app.api.routes import datasets, health, jobs
from app.api.routes.health import REQUEST_SECONDS
from worker.reaper import reap_forever


@asynccontextmanager
async def lifespan(_app: FastAPI):
    # Jobs whose worker died are taken up again (or failed) even when no worker is left to notice.
    stop = threading.Event()
    thread = threading.Thread(target=reap_forever, args=(stop,), daemon=True, name="reaper")
    thread.start()
    yield
    stop.set()


app = FastAPI(title="distill", version="0.1.0", lifespan=lifespan,
              description="Knowledge distillation of large language models with MiniLLM, as a service.")  # fmt: skip


def _json_safe(value):
    """`value` with every non-finite float as text: JSON has no inf or nan."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


@app.exception_handler(RequestValidationError)
async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422 body; an echoed input of 1e999 (read as inf) would otherwise fail to render (a 500)."""
    return JSONResponse(status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))})


api = APIRouter(prefix="/api/v1")
api.include_router(jobs.router)
api.include_router(datasets.router)
app.include_router(api)
app.include_router(health.router)

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


