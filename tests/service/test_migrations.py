import uuid

from alembic import command
from alembic.config import Config
from helpers import PG, create_database, drop_database
from sqlalchemy import create_engine, inspect

from worker.engine.paths import PROJECT_ROOT

TABLES = {
    "users",
    "api_tokens",
    "datasets",
    "jobs",
    "job_events",
    "metrics",
    "evals",
    "checkpoints",
    "workers",
    "webhook_deliveries",
    "device_leases",
}


def test_migrations_upgrade_and_downgrade_on_an_empty_postgresql_database():
    name = f"distill_migrate_{uuid.uuid4().hex[:8]}"
    create_database(name)
    url = f"{PG}/{name}"
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.attributes["url"] = url
    engine = create_engine(url)
    try:
        command.upgrade(config, "head")
        assert TABLES <= set(inspect(engine).get_table_names())
        assert "samples" in {c["name"] for c in inspect(engine).get_columns("evals")}  # 0006
        assert "placement" in {c["name"] for c in inspect(engine).get_columns("jobs")}  # 0008
        command.downgrade(config, "base")
        assert not TABLES & set(inspect(engine).get_table_names())
        command.upgrade(config, "head")  # and back up again
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
        drop_database(name)
