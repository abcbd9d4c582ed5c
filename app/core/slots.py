"""How many event streams and uploads each user holds open, so one user cannot tie up an API process
with unlimited long requests (a stream polls the database twice a second; an upload holds a file and
its part of the user's quota while its client sends).

Counted per API process, in memory: a request's cost falls on the process that serves it, which is
what the cap protects, and an in-memory count cannot outlive a crashed process the way rows in a
shared table would. With N replicas a user may hold up to N times the cap in all.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Hashable, Iterator
from contextlib import contextmanager

_open: Counter[Hashable] = Counter()
_lock = threading.Lock()


class TooMany(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


@contextmanager
def slot(key: Hashable, limit: int) -> Iterator[None]:
    """Hold one of `limit` slots of `key` (a kind of request and a user) for the body of the `with`;
    TooMany if all are taken."""
    with _lock:
        if _open[key] >= limit:
            raise TooMany(limit)
        _open[key] += 1
    try:
        yield
    finally:
        with _lock:
            _open[key] -= 1
            if not _open[key]:
                del _open[key]
