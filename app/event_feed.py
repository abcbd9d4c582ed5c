"""What the API's event streams wait on between their reads: one reader of the database per API
process, for every open stream.

Each stream used to poll the database on its own twice a second: 50 open streams were 100 sessions a
second, and took about as much of an API process's time as 200 concurrent submits (py-spy on the API
during tests/chaos, "load"), time that another user's requests waited for. Now a stream reads its
job's events only when there is something new: in between it waits on the feed, which, while any
stream waits, reads the newest event id of every followed job in one query every POLL_SECONDS, and
wakes the streams whose job has moved on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable
from weakref import WeakKeyDictionary

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from app.core.db import session_factory
from app.models import JobEvent

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


def newest_events(job_ids: Iterable[str]) -> dict[str, int]:
    """The id of the newest event of each job among `job_ids` that has one, in one query. A job's end
    is an event too (committed with its status), so this is all a stream needs to know to read again."""
    query = select(JobEvent.job_id, func.max(JobEvent.id)).where(JobEvent.job_id.in_(list(job_ids)))
    with session_factory()() as session:
        return dict(session.execute(query.group_by(JobEvent.job_id)).all())


class EventFeed:
    """The newest event of each job that streams wait on, read every `interval` seconds while any stream waits."""

    def __init__(self, interval: float = POLL_SECONDS) -> None:
        self.interval = interval
        self.followed: Counter[str] = Counter()  # job id -> streams waiting on it
        self.newest: dict[str, int] = {}
        self.moved = asyncio.Condition()
        self.reader: asyncio.Task | None = None

    async def wait(self, job_id: str, after: int, timeout: float) -> bool:
        """Wait until job `job_id` has an event past id `after` (True), or until `timeout` seconds have
        passed (False: the stream reads for itself, so that a feed that cannot read the database delays
        a stream but never stalls it)."""
        self.followed[job_id] += 1
        if self.reader is None or self.reader.done():
            self.reader = asyncio.create_task(self._read())
        try:
            async with self.moved:
                await asyncio.wait_for(self.moved.wait_for(lambda: self.newest.get(job_id, 0) > after), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self.followed[job_id] -= 1
            if not self.followed[job_id]:
                del self.followed[job_id]
                self.newest.pop(job_id, None)

    async def _read(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.followed:  # the last stream has gone: the next wait() starts a reader again
                return
            try:
                newest = await asyncio.to_thread(newest_events, list(self.followed))
            except SQLAlchemyError as err:
                log.warning("event streams: could not read the jobs' latest events (%s); retrying", err)
                continue
            async with self.moved:
                self.newest.update((job_id, last) for job_id, last in newest.items() if job_id in self.followed)
                self.moved.notify_all()


_feeds: WeakKeyDictionary[asyncio.AbstractEventLoop, EventFeed] = WeakKeyDictionary()


def event_feed() -> EventFeed:
    """The running event loop's feed: a server runs one loop; a test client may run a loop per request."""
    loop = asyncio.get_running_loop()
    if loop not in _feeds:
        _feeds[loop] = EventFeed()
    return _feeds[loop]
