"""Which workers are alive and which queues they consume (the `workers` table).

Each `distill worker` registers its queues when it starts, its reaper thread refreshes the row every
heartbeat, and it removes the row when it stops. A worker killed without stopping keeps its row, but
a row not refreshed within the liveness window no longer counts as serving anything. All times are
the database's clock, like job heartbeats.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core.db import db_now
from app.models import RegisteredWorker

# Rows of workers that died without unregistering are deleted once this old: nothing reads them.
FORGET_AFTER = timedelta(days=1)


def worker_name() -> str:
    """This process as a worker: its registry row and the jobs it claims carry this name."""
    return f"{socket.gethostname()}:{os.getpid()}"


def register(session: Session, name: str, queues: Iterable[str]) -> None:
    """Record that worker `name` is alive now and consumes `queues`."""
    now = db_now(session)
    row = session.get(RegisteredWorker, name)
    if row is None:
        session.add(RegisteredWorker(name=name, queues=list(queues), started_at=now, seen_at=now))
    else:
        row.queues, row.seen_at = list(queues), now
    session.execute(delete(RegisteredWorker).where(RegisteredWorker.seen_at < now - FORGET_AFTER))
    session.commit()


def unregister(session: Session, name: str) -> None:
    """Worker `name` stopped: it serves nothing from now on."""
    session.execute(delete(RegisteredWorker).where(RegisteredWorker.name == name))
    session.commit()


def served_queues(session: Session, within: timedelta) -> set[str]:
    """The queues some worker consumes that was seen within `within`."""
    rows = session.scalars(select(RegisteredWorker.queues).where(RegisteredWorker.seen_at >= db_now(session) - within))
    return {queue for queues in rows for queue in queues}
