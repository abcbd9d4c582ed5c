"""The fault campaign's fixtures: one private stack (PostgreSQL, Redis, API) for the session, workers
per scenario, and the figures each scenario records, written to docs/reliability.md at the end.

Run it with `make chaos` (or `.venv/bin/python -m pytest -q tests/chaos`); the default `pytest` run
skips this directory (see `--ignore` in pyproject.toml), because it restarts its own databases and
takes minutes.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
from chaos_stack import Stack
from helpers import write_dataset
from reliability_report import write_report

# nodeid -> {"scenario", "fault", "figures", "outcome", "error", "seconds"}; filled by the tests and the hooks below.
RESULTS: dict[str, dict] = {}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "scenario(name, fault): a fault-campaign scenario, reported in docs/reliability.md"
    )


@pytest.fixture(scope="session")
def stack():
    root = Path(tempfile.mkdtemp(prefix="distill-chaos-"))
    root.chmod(0o755)  # the postgres OS user must reach its data directory inside
    stack = Stack(root)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        if not (root / "keep").exists():  # touch ROOT/keep during a run to keep the logs for a look
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def dataset(stack) -> Path:
    return write_dataset(stack.root / "dataset")


@pytest.fixture
def figures(request) -> dict:
    """The scenario's figures, filled by the test as it goes: a failed scenario still reports what it saw."""
    marker = request.node.get_closest_marker("scenario")
    assert marker is not None, "every chaos test names its scenario with @pytest.mark.scenario(name, fault=...)"
    entry = RESULTS.setdefault(request.node.nodeid, {})
    entry.update(scenario=marker.args[0], fault=marker.kwargs["fault"], figures={}, started=time.monotonic())
    return entry["figures"]


@pytest.fixture(autouse=True)
def workers_stop_after_each_scenario(stack):
    """Each scenario starts the workers it needs and leaves none behind for the next."""
    yield
    stack.stop_workers()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    entry = RESULTS.get(item.nodeid)
    if entry is None or report.when != "call":
        return
    entry["outcome"] = "passed" if report.passed else "FAILED"
    entry["seconds"] = time.monotonic() - entry.pop("started")
    if report.failed:
        entry["error"] = str(call.excinfo.value).strip().splitlines()[0][:300] if call.excinfo else "failed"


def pytest_sessionfinish(session, exitstatus):
    if RESULTS:
        write_report(list(RESULTS.values()), Path(session.config.rootpath) / "docs" / "reliability.md")
