"""Service settings, from the environment (prefix DISTILL_) or a .env file.

The defaults are the embedded set-up: a SQLite file, a broker that needs no server (Celery's
SQLAlchemy transport on a second SQLite file) and artifacts on local disk, all under `data_dir`.
Production points the same settings at PostgreSQL, Redis and shared storage.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILL_", env_file=".env", env_ignore_empty=True, extra="ignore")

    data_dir: Path = Field(Path(".distill"), description="Embedded default home of the database, broker and artifacts.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; e.g. postgresql+psycopg://user@host/db. Default: SQLite in data_dir.")
    broker_url: str | None = Field(None, description="Celery broker; e.g. redis://host:6379/0. Default: SQLAlchemy transport in data_dir.")
    artifacts_dir: Path | None = Field(None, description="Where jobs write checkpoints and uploads live. Default: data_dir/artifacts.")
    host: str = Field("127.0.0.1", description="Address the API binds to (127.0.0.1: this machine only).")
    port: int = Field(8000, description="Port the API listens on.")
    max_upload_bytes: int = Field(200 * 1024 * 1024, description="Largest dataset upload accepted.")
    max_active_jobs_per_user: int = Field(20, ge=1, description="Jobs a user may have queued or running at once; more is a 429.")
    max_dataset_bytes_per_user: int = Field(
        10 * 1024**3, ge=0, description="Bytes of uploaded datasets a user may keep; an upload past it is a 429."
    )
    max_attempts: int = Field(3, ge=1, description="Times a job is started before a lost worker marks it failed.")
    heartbeat_seconds: float = Field(10.0, gt=0, description="How often a worker reports that a job is alive.")
    heartbeat_timeout_seconds: float = Field(120.0, gt=0, description="A running job silent this long is taken up again.")
    cancel_grace_seconds: float = Field(
        20.0, gt=0, description="How long a cancelled job may take to stop by itself before its processes are killed."
    )
    visibility_timeout_seconds: int = Field(7 * 24 * 3600, description="Redis redelivery timeout; above the longest job.")
    auto_accelerator: str = Field("cpu", description="Queue kind for jobs with resources.accelerator auto: cpu or gpu.")
    worker_cpu_processes: int = Field(2, ge=1, description="Largest resources.devices a CPU worker takes.")
    hostfile: Path | None = Field(None, description="DeepSpeed hostfile: run multi-process jobs across these machines.")
    secret_key: str | None = Field(None, description="Signs short-lived download links; the same on every API replica. "
                                   "Default: generated once into data_dir/secret_key.")
    s3_bucket: str | None = Field(None, description="Keep checkpoints in this S3 bucket too; downloads are redirected there.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, R2...); default: AWS.")
    s3_prefix: str = Field("distill", description="Key prefix of everything stored in the bucket.")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'distill.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def resolved_artifacts_dir(self) -> Path:
        return (self.artifacts_dir or self.data_dir / "artifacts").resolve()


@lru_cache
def get_settings() -> Settings:
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings
