"""Routes that give their database connection back before FastAPI serialises their answer.

FastAPI runs a sync route and then the validation of its return value in two separate threadpool
calls, and closes the request's session (a `yield` dependency) only after the response is sent. A
connection still checked out when the route returns is thus held by a request waiting for a free
thread, while every thread (40) may be waiting for a connection (the pool has 15): nothing moves
until the pool times out, and requests fail. Two hundred concurrent submits did exactly that
(tests/chaos, scenario "200 concurrent submits"). Closing the session as the route returns ends the
wait: a thread waiting for a connection now only waits for routes that are running.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from fastapi.routing import APIRoute
from sqlalchemy.orm import Session


def _closing_sessions(endpoint: Callable) -> Callable:
    @functools.wraps(endpoint)  # FastAPI reads the parameters through __wrapped__
    def route(*args, **kwargs):
        try:
            return endpoint(*args, **kwargs)
        finally:
            # What the route committed stays; anything else is rolled back, as the dependency's own
            # close would have done. Loaded objects keep their values (the tables have no lazy relations).
            for value in kwargs.values():
                if isinstance(value, Session):
                    value.close()

    return route


class ReleasingRoute(APIRoute):
    """An APIRoute whose sync endpoint closes its sessions when it returns (see above)."""

    def __init__(self, path: str, endpoint: Callable, **kwargs):
        if (
            not inspect.iscoroutinefunction(endpoint)
            and not inspect.isasyncgenfunction(endpoint)
            and not inspect.isgeneratorfunction(endpoint)
        ):
            endpoint = _closing_sessions(endpoint)
        super().__init__(path, endpoint, **kwargs)
