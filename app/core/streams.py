"""How many event streams each user holds open, so one user cannot tie up an API process with
unlimited streams (each holds a connection and polls the database twice a second).

Counted per API process, in memory: a stream's cost falls on the process that serves it, which is
what the cap protects, and an in-memory count cannot outlive a crashed process the way rows in a
shared table would. With N replicas a user may hold up to N times the cap in all.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

_open: Counter[int] = Counter()
_lock = threading.Lock()


class TooManyStreams(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


@contextmanager
def stream_slot(user_id: int, limit: int) -> Iterator[None]:
    """Hold one of the user's `limit` stream slots for the body of the `with`; TooManyStreams if all are taken."""
    with _lock:
        if _open[user_id] >= limit:
            raise TooManyStreams(limit)
        _open[user_id] += 1
    try:
        yield
    finally:
        with _lock:
            _open[user_id] -= 1
            if not _open[user_id]:
                del _open[user_id]
