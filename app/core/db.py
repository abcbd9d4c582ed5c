"""Database engine and sessions. SQLite (the embedded default) gets WAL and a busy timeout, because
the API, the worker and the training process write to it at the same time."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from functools import lru_cache

from sqlalchemy import DateTime, Engine, create_engine, event, func, select, type_coerce
from sqlalchemy.orm import Session, sessionmaker

from .config import get_settings


def make_engine(url: str, **kwargs) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().resolved_database_url)


def session_factory() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


def get_session() -> Iterator[Session]:
    with session_factory()() as session:
        yield session


def db_clock(session: Session):
    """The database's clock as an SQL expression, for a query to compare with in the same round trip."""
    if session.get_bind().dialect.name == "sqlite":
        return type_coerce(func.strftime("%Y-%m-%d %H:%M:%f", "now"), DateTime(timezone=True))
    return func.now()


def db_now(session: Session) -> datetime:
    """The database's clock. Leases, heartbeats, timeouts and worker liveness are all read off this
    one clock: each machine's own would let a worker whose clock runs two minutes slow have its jobs
    reaped."""
    return session.scalar(select(db_clock(session)))
