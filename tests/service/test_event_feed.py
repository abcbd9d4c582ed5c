"""EventFeed, what the event streams of an API process wait on: woken by a new event (a job's end is
one), else back after their timeout, and one query per tick however many streams wait (real database)."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import queued_job
from sqlalchemy import event

from app import crud, job_status
from app.core.db import get_engine, session_factory
from app.event_feed import EventFeed, newest_events


@pytest.fixture
def jobs():
    """A function making queued jobs of a new user; they are cancelled afterwards, so that no worker of
    a later test is sent them."""
    made = []

    def make(n: int) -> list[str]:
        with session_factory()() as session:
            user, _ = crud.create_user(session, f"followed-{time.monotonic_ns()}")
            for _ in range(n):
                made.append(queued_job(session, user, "followed").id)
        return made[-n:]

    yield make
    with session_factory()() as session:
        for job_id in made:
            job_status.request_cancel(session, job_id)


def test_a_stream_is_woken_by_a_new_event_or_its_jobs_end_and_else_waits_out_its_timeout(jobs):
    logged, cancelled, quiet = jobs(3)
    newest = newest_events([logged, cancelled, quiet])

    async def test():
        feed = EventFeed(interval=0.05)
        started = time.monotonic()
        waits = [
            asyncio.create_task(feed.wait(logged, newest[logged], timeout=10)),
            asyncio.create_task(feed.wait(cancelled, newest[cancelled], timeout=10)),
            asyncio.create_task(feed.wait(quiet, newest[quiet], timeout=0.5)),
        ]
        await asyncio.sleep(0.2)
        assert not any(w.done() for w in waits)  # nothing has happened to any of them

        def happen():
            with session_factory()() as session:
                crud.add_event(session, logged, "log", "something new")
                job_status.request_cancel(session, cancelled)

        await asyncio.to_thread(happen)
        assert await asyncio.gather(*waits) == [True, True, False]
        return time.monotonic() - started

    # The two woken well before their timeout: within a few of the feed's ticks.
    assert asyncio.run(test()) < 2
    assert newest_events([logged])[logged] > newest[logged]


def test_the_feed_reads_once_a_tick_for_every_waiting_stream(jobs):
    followed = jobs(20)
    newest = newest_events(followed)
    reads = []

    def count(conn, cursor, statement, *args):
        if "job_events" in statement:
            reads.append(statement)

    event.listen(get_engine(), "before_cursor_execute", count)
    try:

        async def test():
            feed = EventFeed(interval=0.1)
            # Two streams on each of 20 jobs for a second: 40 streams polling on their own each tick
            # would read the events 400 times.
            waits = [feed.wait(job_id, newest[job_id], timeout=1) for job_id in followed for _ in range(2)]
            return await asyncio.gather(*waits)

        assert asyncio.run(test()) == [False] * 40
    finally:
        event.remove(get_engine(), "before_cursor_execute", count)
    assert 5 <= len(reads) <= 11, len(reads)  # one a tick
