"""Helpers shared by the tests (fixtures live in the conftest files)."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import psycopg

from worker.engine.paths import PROJECT_ROOT

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


def queued_job(session, user, name: str):
    """A job of `user` queued on cpu-1 straight in the database, without spec checks or a broker message:
    for tests of what reads jobs, not of how they are submitted."""
    from app import job_status

    job, _ = job_status.create(
        session,
        user,
        {"name": name},
        queue="cpu-1",
        total_steps=1,
        max_attempts=1,
        idempotency_key=None,
        max_active=100,
        key_lifetime=timedelta(hours=24),
    )
    return job


def write_dataset(directory: Path, train_records: int = 64, eval_records: int = 16) -> Path:
    """`train.jsonl` and `eval.jsonl` in the Dolly layout (instruction, input, output), made here.

    The instructions are the project's builtin demo prompts; each response is a sentence built from
    its instruction, so every record has gold text for SFT, KD and the LM term. The tests need
    records of the right shape, not good answers: the models they train are tiny and random.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name, source, count in (("train", "demo_train", train_records), ("eval", "demo_eval", eval_records)):
        lines = (
            (PROJECT_ROOT / "worker" / "engine" / "builtin_data" / f"{source}.jsonl").read_text().splitlines()[:count]
        )
        with (directory / f"{name}.jsonl").open("w") as out:
            for line in lines:
                record = json.loads(line)
                topic = record["instruction"].rstrip(".?!").lower()
                record["output"] = f"Here is a short answer to the request to {topic}. It is kept brief and ends here."
                out.write(json.dumps(record) + "\n")
    return directory


def tiny_spec(dataset: Path, **overrides) -> dict:
    """A job on the tiny random models that finishes in seconds; sections in `overrides` are merged."""
    spec = {
        "name": "tiny",
        "method": "minillm",
        "teacher": "builtin:tiny-teacher",
        "student": {"model": "builtin:tiny-student"},
        "data": {
            "train": str(dataset / "train.jsonl"),
            "eval": str(dataset / "eval.jsonl"),
            "prompt_format": "alpaca",
            "max_prompt_tokens": 128,
            "max_response_tokens": 12,
            "max_train_records": 48,
        },
        "training": {"steps": 6, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0},
        "minillm": {"rollouts_per_phase": 4, "rollout_batch_size": 4, "ppo_epochs": 2},
        "eval": {"every_steps": 3, "num_prompts": 4, "selection_num_prompts": 4, "batch_size": 4},
        "checkpoints": {"every_steps": 3, "keep": 2},
        "deepspeed": {"precision": "fp32"},
    }
    for key, value in overrides.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    return spec


def two_device_spec(dataset: Path, steps: int = 4) -> dict:
    """A KD job of `steps` steps on 2 devices (under the DeepSpeed launcher), with no evaluation or checkpoint."""
    return tiny_spec(
        dataset,
        method="kd",
        resources={"devices": 2},
        training={"steps": steps},
        eval={"every_steps": 0},
        checkpoints={"every_steps": 0},
    )


def read_events(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "events.jsonl").read_text().splitlines()]


def make_user(name: str | None = None) -> dict:
    from app import crud
    from app.core.db import session_factory

    with session_factory()() as session:
        _user, token = crud.create_user(session, name or f"user-{uuid.uuid4().hex[:6]}")
    return {"Authorization": f"Bearer {token}"}


class Worker:
    """A real `distill worker` process that tests can start and SIGKILL."""

    def __init__(
        self, log: Path, queues: str | None = None, cwd: Path | None = None, environ: dict | None = None, **env: str
    ):
        """`queues`: default, those of the worker's devices; `environ`: the environment to start from
        (default: this process's); `env`: changes to it."""
        self.log, self.queues, self.cwd, self.process = log, queues, cwd, None
        self.environ = {**(os.environ if environ is None else environ), **env}

    def start(self) -> "Worker":
        env = {
            k: v
            for k, v in self.environ.items()
            if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        }
        queues = [] if self.queues is None else ["--queues", self.queues]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", *queues],
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.cwd,
        )
        return self

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def training_process(job_id: str) -> list[int]:
    """PIDs of the training processes of a job (the worker's children)."""
    out = subprocess.run(["pgrep", "-f", f"worker.job_process {job_id}"], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def rank_processes(job_id: str) -> dict[int, int]:
    """PIDs of a job's ranks under the DeepSpeed launcher (`python -m worker.job_process
    --local_rank=N JOB ...`), by local rank."""
    ranks = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0")]
        except OSError:  # ended meanwhile
            continue
        flags = [a for a in argv if a.startswith("--local_rank=")]
        if "worker.job_process" in argv and job_id in argv and flags:
            ranks[int(flags[0].split("=", 1)[1])] = int(proc.name)
    return ranks


def wait_for(predicate, timeout: float = 300, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def create_database(name: str) -> None:
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(name: str) -> None:
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def submit(client, auth, spec) -> str:
    """POST a job spec to the API; the new job's id."""
    response = client.post("/api/v1/jobs", json=spec, headers=auth)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def job(client, auth, job_id) -> dict:
    return client.get(f"/api/v1/jobs/{job_id}", headers=auth).json()


def wait_status(client, auth, job_id, statuses, timeout=300) -> dict:
    """The job once its status is one of `statuses`."""
    return wait_for(
        lambda: (j := job(client, auth, job_id))["status"] in statuses and j, timeout, what=f"{job_id} {statuses}"
    )
