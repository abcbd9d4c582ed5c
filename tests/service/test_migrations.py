import json
import uuid
from contextlib import contextmanager

from alembic import command
from alembic.config import Config
from helpers import PG, create_database, drop_database
from sqlalchemy import create_engine, inspect, text

from worker.engine.paths import PROJECT_ROOT

TABLES = {
    "users",
    "api_tokens",
    "datasets",
    "jobs",
    "job_events",
    "evals",
    "checkpoints",
    "workers",
    "webhook_deliveries",
    "device_leases",
}


@contextmanager
def scratch_database():
    """Alembic's config and an engine on a new, empty PostgreSQL database, dropped afterwards."""
    name = f"distill_migrate_{uuid.uuid4().hex[:8]}"
    create_database(name)
    url = f"{PG}/{name}"
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.attributes["url"] = url
    engine = create_engine(url)
    try:
        yield config, engine
    finally:
        engine.dispose()
        drop_database(name)


def test_migrations_upgrade_and_downgrade_on_an_empty_postgresql_database():
    with scratch_database() as (config, engine):
        command.upgrade(config, "head")
        assert TABLES <= set(inspect(engine).get_table_names())
        assert "samples" in {c["name"] for c in inspect(engine).get_columns("evals")}  # 0006
        assert "placement" in {c["name"] for c in inspect(engine).get_columns("jobs")}  # 0008
        command.downgrade(config, "base")
        assert not TABLES & set(inspect(engine).get_table_names())
        command.upgrade(config, "head")  # and back up again
        assert TABLES <= set(inspect(engine).get_table_names())


def test_0009_moves_a_jobs_webhook_out_of_its_stored_spec_and_back():
    specs = {
        "job-a": {"name": "a", "notify": {"webhook_url": "https://ci.example.com/h"}},
        "job-b": {"name": "b", "notify": {"webhook_url": None}},
        "job-c": {"name": "c"},
    }
    with scratch_database() as (config, engine):
        command.upgrade(config, "0008")
        with engine.begin() as db:
            db.execute(text("INSERT INTO users (id, name, created_at) VALUES (1, 'u', now())"))
            for job_id, spec in specs.items():
                db.execute(
                    text(
                        "INSERT INTO jobs (id, user_id, name, status, spec, queue, created_at, attempts, max_attempts,"
                        " step, total_steps, latest_metrics, request_hash)"
                        " VALUES (:id, 1, 'n', 'queued', :spec, 'cpu-1', now(), 0, 1, 0, 1, '{}', 'h')"
                    ),
                    {"id": job_id, "spec": json.dumps(spec)},
                )
        command.upgrade(config, "0009")
        with engine.connect() as db:
            rows = {r.id: (r.spec, r.webhook_url) for r in db.execute(text("SELECT id, spec, webhook_url FROM jobs"))}
        assert rows == {
            "job-a": ({"name": "a"}, "https://ci.example.com/h"),
            "job-b": ({"name": "b"}, None),
            "job-c": ({"name": "c"}, None),
        }
        command.downgrade(config, "0008")
        with engine.connect() as db:
            back = {r.id: r.spec for r in db.execute(text("SELECT id, spec FROM jobs"))}
        assert back["job-a"] == specs["job-a"] and back["job-c"] == {"name": "c", "notify": {"webhook_url": None}}


def test_0010_keeps_the_metrics_in_their_events_and_refills_the_old_table_on_downgrade():
    with scratch_database() as (config, engine):
        command.upgrade(config, "0009")
        with engine.begin() as db:
            db.execute(text("INSERT INTO users (id, name, created_at) VALUES (1, 'u', now())"))
            db.execute(
                text(
                    "INSERT INTO jobs (id, user_id, name, status, spec, queue, created_at, attempts, max_attempts,"
                    " step, total_steps, latest_metrics, request_hash)"
                    " VALUES ('job-a', 1, 'n', 'running', '{}', 'cpu-1', now(), 2, 3, 2, 9, '{}', 'h')"
                )
            )
            for step, loss in ((1, 3.0), (2, 2.5), (2, 2.0)):  # step 2 ran again, after a resume
                data = json.dumps({"step": step, "stage": "minillm", "values": {"loss": loss}})
                db.execute(
                    text(
                        "INSERT INTO job_events (job_id, created_at, type, level, message, data)"
                        " VALUES ('job-a', now(), 'metrics', 'debug', '', :data)"
                    ),
                    {"data": data},
                )
        command.upgrade(config, "head")
        assert "metrics" not in inspect(engine).get_table_names()
        assert "latest_metrics" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
        command.downgrade(config, "0009")
        with engine.connect() as db:
            points = db.execute(text("SELECT step, name, value FROM metrics ORDER BY step")).all()
            latest = db.execute(text("SELECT latest_metrics FROM jobs")).scalar_one()
        assert [tuple(p) for p in points] == [(1, "loss", 3.0), (2, "loss", 2.0)]
        assert latest == {"step": 2, "stage": "minillm", "loss": 2.0}


def test_0012_indexes_job_events_by_job_and_id():
    """max(id) of one job's events, which every event stream asks each tick, can be read from the end of
    the (job_id, id) index; the index on job_id alone, a prefix of it, goes."""
    with scratch_database() as (config, engine):
        command.upgrade(config, "head")
        indexes = {i["name"]: i["column_names"] for i in inspect(engine).get_indexes("job_events")}
        assert indexes["ix_job_events_job_id_id"] == ["job_id", "id"] and "ix_job_events_job_id" not in indexes
        command.downgrade(config, "0011")
        indexes = {i["name"]: i["column_names"] for i in inspect(engine).get_indexes("job_events")}
        assert indexes["ix_job_events_job_id"] == ["job_id"] and "ix_job_events_job_id_id" not in indexes
