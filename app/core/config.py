"""Service settings, from the environment (prefix DISTILL_) or a .env file.

The defaults are the embedded set-up: a SQLite file, a broker that needs no server (Celery's
SQLAlchemy transport on a second SQLite file) and artifacts on local disk, all under `data_dir`.
Production points the same settings at PostgreSQL, Redis and shared storage.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# A list of folders in one variable, separated as in PATH: DISTILL_DATA_ROOTS=/srv/data:/mnt/shared
PathList = Annotated[list[Path], NoDecode]
NameList = Annotated[list[str], NoDecode]
# Signing keys in one variable: DISTILL_SECRET_KEY=KID:SECRET,KID:SECRET (the first signs)
SigningKeys = Annotated[list[tuple[str, str]], NoDecode]
KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # also safe as a file name


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DISTILL_",
        env_file=".env",
        env_ignore_empty=True,
        extra="ignore",
        hide_input_in_errors=True,  # a malformed DISTILL_SECRET_KEY must not be printed in the start-up error
    )

    data_dir: Path = Field(Path(".distill"), description="Embedded default home of the database, broker and artifacts.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; e.g. postgresql+psycopg://user@host/db. Default: SQLite in data_dir."
    )
    broker_url: str | None = Field(
        None, description="Celery broker; e.g. redis://host:6379/0. Default: SQLAlchemy transport in data_dir."
    )
    artifacts_dir: Path | None = Field(
        None, description="Where jobs write checkpoints and uploads live. Default: data_dir/artifacts."
    )
    host: str = Field("127.0.0.1", description="Address the API binds to (127.0.0.1: this machine only).")
    port: int = Field(8000, description="Port the API listens on.")
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token a Prometheus scraper sends to GET /metrics (every tenant's job counts and "
        "queue depths). Unset: /metrics answers requests from this machine (loopback) only.",
    )
    max_upload_bytes: int = Field(200 * 1024 * 1024, description="Largest dataset upload accepted.")
    max_active_jobs_per_user: int = Field(
        20, ge=1, description="Jobs a user may have queued or running at once; more is a 429."
    )
    max_dataset_bytes_per_user: int = Field(
        10 * 1024**3, ge=0, description="Bytes of uploaded datasets a user may keep; an upload past it is a 429."
    )
    max_run_minutes: float = Field(
        7 * 24 * 60,
        gt=0,
        description="The longest an attempt of any job may run before the worker stops it (TimeLimit, failed); "
        "a spec's resources.max_run_minutes may ask for less, not more.",
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Finished jobs are deleted this long after they ended, with their files and bucket objects "
        "(as DELETE /jobs/{id} does). Empty: kept until a user deletes them.",
    )
    idempotency_key_hours: float = Field(
        24.0,
        gt=0,
        description="How long an Idempotency-Key names the job it created; a submit with the key after that "
        "creates a new job (a CI pipeline re-run with the same run id).",
    )
    max_attempts: int = Field(3, ge=1, description="Times a job is started before a lost worker marks it failed.")
    heartbeat_seconds: float = Field(10.0, gt=0, description="How often a worker reports that a job is alive.")
    heartbeat_timeout_seconds: float = Field(
        120.0, gt=0, description="A running job silent this long is taken up again."
    )
    progress_timeout_seconds: float | None = Field(
        7200.0,
        gt=0,
        description="A running job that records no step and no event for this long is stopped and "
        "retried (a hang outside any collective, which time out by themselves). Empty: never.",
    )
    cancel_grace_seconds: float = Field(
        20.0, gt=0, description="How long a cancelled job may take to stop by itself before its processes are killed."
    )
    visibility_timeout_seconds: int = Field(
        7 * 24 * 3600, description="Redis redelivery timeout; above the longest job."
    )
    refuse_unserved_queues: bool = Field(
        False,
        description="Refuse (422) a job whose queue no live worker consumes, instead of queuing it with a warning.",
    )
    worker_cpu_processes: int = Field(
        2,
        ge=1,
        description="Largest resources.devices a CPU worker takes (a worker "
        "without GPUs runs one job at a time: jobs would share the machine's cores).",
    )
    worker_gpus: int | None = Field(
        None,
        ge=0,
        description="GPUs a worker hands out to jobs, as CUDA ordinals 0..N-1; "
        "it runs jobs side by side on disjoint sets of them. Default: the GPUs nvidia-smi "
        "lists. 0: a CPU worker.",
    )
    hostfile: Path | None = Field(
        None,
        description="DeepSpeed hostfile of this worker's node group (HOST slots=G "
        "lines, this machine first): it also runs jobs of 2, 3, ... whole machines across them.",
    )
    secret_key: SigningKeys = Field(
        [],
        description="Keys that sign download links, as KID:SECRET separated by ',': "
        "the first signs, all are accepted; a lone SECRET has key id 'default'. The same on "
        "every API replica. Empty: key files in data_dir/keys, managed with `distill keys`.",
    )
    max_streams_per_user: int = Field(
        8, ge=1, description="Event streams a user may hold open on one API process; more is a 429."
    )
    rate_limit_storage: str = Field(
        "memory://",
        description="Where rate-limit counters live (a `limits` storage URL). memory://: each API process "
        "counts on its own; with several replicas, a shared one such as redis://host:6379/2.",
    )
    failed_sign_in_limit: str = Field(
        "20/minute", description="Failed sign-ins (unknown, revoked or expired tokens) per client address; then 429."
    )
    submit_limit: str = Field("120/minute", description="Job submissions (and validations) per user; then 429.")
    upload_limit: str = Field("60/minute", description="Dataset uploads per user; then 429.")
    requests_at_once: int = Field(
        2,
        ge=1,
        description="Requests with a bearer token that an API process works on at once, taken in turn from "
        "each client with requests waiting, plus one place kept for a client with nothing running; the "
        "others wait holding no thread or database connection, so that one client's burst cannot stall "
        "everyone else.",
    )
    max_uploads_per_user: int = Field(
        4, ge=1, description="Dataset uploads a user may send at once to one API process; more is a 429."
    )
    upload_idle_seconds: float = Field(
        30.0,
        gt=0,
        description="A request body (an upload, a job spec) whose client sends nothing for this long is dropped (408).",
    )
    model_roots: PathList = Field(
        [],
        description="Folders of model directories that job specs may name by absolute "
        "path, separated by ':'; symlinks are resolved before the check. Empty: none.",
    )
    data_roots: PathList = Field(
        [],
        description="Folders of data files that job specs may name by absolute path, "
        "separated by ':'. Empty: data comes only as builtin:NAME or an upload (dataset:ID).",
    )
    allow_hub_models: bool = Field(True, description="Whether specs may name hub ids (org/name) that workers download.")
    hub_models: NameList = Field(
        [],
        description="Hub ids specs may name, as patterns separated by ',' (Qwen/*, meta-llama/Llama-3.1-8B); "
        "empty: any, where allow_hub_models is on.",
    )
    hub_max_gb: float = Field(
        100.0,
        gt=0,
        description="Read by the training processes: the most a hub model's weights, tokenizer and config may "
        "take; a bigger one fails the job before anything downloads.",
    )
    trackers: str = Field(
        "",
        pattern=r"^((mlflow|tensorboard|wandb)(,(mlflow|tensorboard|wandb))*)?$",
        description="Read by the training processes: the experiment trackers of jobs whose spec names none "
        "(tracking.trackers), a comma list of mlflow, tensorboard and wandb. MLflow's server: MLFLOW_TRACKING_URI; "
        "W&B reads its own WANDB_* variables.",
    )
    api_sees_worker_files: bool = Field(
        True,
        description="Whether the API machine has the workers' model and data roots at the same paths (the "
        "embedded set-up): then submit checks those files exist; else it checks only where they are, and workers "
        "check the rest when the job starts.",
    )
    s3_bucket: str | None = Field(
        None, description="Keep checkpoints in this S3 bucket too; downloads are redirected there."
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, R2...); default: AWS.")
    s3_prefix: str = Field("distill", description="Key prefix of everything stored in the bucket.")
    webhook_allow_private: bool = Field(
        False,
        description="Whether webhooks may go to loopback, private, link-local and other non-public addresses. "
        "Off: a user of a shared service cannot make it post to hosts inside its network (SSRF).",
    )
    webhook_ca_file: FilePath | None = Field(
        None,
        description="PEM file of certificate authorities that webhook receivers' certificates may also be signed by, "
        "beside the public ones: for receivers inside a network with its own CA.",
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="How long one webhook request may take.")
    webhook_retry_seconds: float = Field(
        30.0,
        gt=0,
        description="Wait before a webhook's second round of attempts; it doubles each round, up to an hour.",
    )
    webhook_max_attempts: int = Field(
        12, ge=1, description="Rounds of attempts (each of up to 3 quick tries) before a webhook delivery is given up."
    )

    @field_validator("model_roots", "data_roots", mode="before")
    @classmethod
    def _split_paths(cls, value):
        if isinstance(value, str):
            value = [Path(part) for part in value.split(os.pathsep) if part]
        if any(not Path(root).is_absolute() for root in value):
            raise ValueError("path roots must be absolute paths")
        return value

    @field_validator("hub_models", mode="before")
    @classmethod
    def _split_names(cls, value):
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("failed_sign_in_limit", "submit_limit", "upload_limit")
    @classmethod
    def _a_rate(cls, value: str) -> str:
        from limits import parse

        try:
            parse(value)
        except ValueError:
            raise ValueError("give a rate such as 20/minute, 5/second or 1000/hour") from None
        return value

    @field_validator("secret_key", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            entries = [entry.strip() for entry in value.split(",") if entry.strip()]
            value = [
                tuple(part.strip() for part in entry.split(":", 1)) if ":" in entry else ("default", entry)
                for entry in entries
            ]
        kids = [kid for kid, _ in value]
        if not all(KEY_ID.fullmatch(kid) and secret for kid, secret in value) or len(set(kids)) < len(kids):
            raise ValueError(
                "give KID:SECRET pairs separated by ',', each key id unique and made of 1-64 letters, "
                "digits, '-' or '_', each secret non-empty"
            )
        return value

    @model_validator(mode="after")
    def _roots_apart_from_own_files(self) -> Settings:
        """A root that holds the service's own files (every user's uploads, checkpoints and cached
        teacher outputs), or lies inside them, would undo the isolation the roots exist for."""
        from worker.engine.paths import cache_dir

        own = [Path(os.path.realpath(p)) for p in (self.data_dir, self.resolved_artifacts_dir, cache_dir())]
        for root in self.model_roots + self.data_roots:
            real = Path(os.path.realpath(root))
            for folder in own:
                if folder.is_relative_to(real) or real.is_relative_to(folder):
                    raise ValueError(
                        f"the path root {root} overlaps the service's own files in {folder}: "
                        "users could read each other's uploads and checkpoints through it"
                    )
        return self

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
