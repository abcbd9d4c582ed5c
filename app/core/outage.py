"""What counts as "the database is not there right now", and retrying through it.

A connection refused, dropped or reset (PostgreSQL restarting, a network blip) is worth waiting
for; anything else (a constraint, a bad query) is a bug or a conflict that waiting will not fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

T = TypeVar("T")
OUTAGE = (OperationalError, InterfaceError)


def through_outage(fn: Callable[[], T], seconds: float) -> T:
    """`fn()`, called again with exponential backoff (0.5 s to 5 s) while the database is
    unreachable, for up to `seconds`; then the last error is raised."""
    retrying = Retrying(
        retry=retry_if_exception_type(OUTAGE),
        wait=wait_exponential(multiplier=0.5, max=5),
        stop=stop_after_delay(seconds),
        reraise=True,
    )
    return retrying(fn)
