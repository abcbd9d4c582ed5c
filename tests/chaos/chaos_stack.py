"""The service as it runs in production, on this machine, with processes the campaign may break.

A private PostgreSQL (its own data directory and port) and a private Redis (persistence off, as in
the fault being studied) are started here, never the shared ones on 5432/6379: the campaign stops,
kills and restarts them. The API is a real uvicorn process and the workers real `distill worker`
processes (Celery, solo pool), all configured through the same DISTILL_* variables as a deployment.
The test process only talks HTTP to the API and reads the database with plain SQL, the way an
operator would check the outcome.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from contextlib import closing
from pathlib import Path

import httpx
import psycopg
import redis
from helpers import Worker, wait_for

PG_BIN = Path(os.environ.get("DISTILL_CHAOS_PG_BIN", "/usr/local/bin"))
REDIS_SERVER = os.environ.get("DISTILL_CHAOS_REDIS_SERVER", shutil.which("redis-server") or "/usr/bin/redis-server")


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_postgres(command: list[str]) -> list[str]:
    """initdb and pg_ctl refuse to run as root: run them as the `postgres` OS user when we are root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class Postgres:
    def __init__(self, root: Path):
        self.data, self.log, self.sockets = root / "pgdata", root / "postgres.log", root / "pgsock"
        self.port = free_port()
        for path in (self.data, self.sockets):
            path.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres")
            shutil.chown(self.sockets, "postgres")
            self.log.touch()
            shutil.chown(self.log, "postgres")
        subprocess.run(
            as_postgres(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.sockets} "
            "-c max_connections=300 -c fsync=off"
        )
        subprocess.run(
            as_postgres(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        """`fast`: what a restart does (every session is disconnected); `immediate` would be a crash."""
        subprocess.run(
            as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]),
            check=False,
            capture_output=True,
        )

    def dsn(self, dbname: str = "distill") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/distill"

    def create_database(self) -> None:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute('CREATE DATABASE "distill"')


class Redis:
    """redis-server with no RDB snapshots and no AOF: a restart forgets every queued message."""

    def __init__(self, root: Path):
        self.dir, self.log = root / "redis", root / "redis.log"
        self.dir.mkdir()
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--protected-mode",
                "no",
            ],
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
        )
        wait_for(self.answers, timeout=20, interval=0.1, what="redis-server to answer")

    def answers(self) -> bool:
        try:
            return redis.Redis(port=self.port, socket_timeout=1).ping()
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: the server dies with whatever it held in memory."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class Stack:
    """PostgreSQL + Redis + the API, and workers started on demand."""

    def __init__(self, root: Path):
        self.root = root
        self.postgres, self.redis = Postgres(root), Redis(root)
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.api: subprocess.Popen | None = None
        self.workers: list[Worker] = []
        self.env = {
            "DISTILL_DATABASE_URL": self.postgres.url(),
            "DISTILL_BROKER_URL": self.redis.url(),
            "DISTILL_DATA_DIR": str(root / "data"),
            "DISTILL_ARTIFACTS_DIR": str(root / "artifacts"),
            "DISTILL_SECRET_KEY": "chaos-campaign",
            # Job specs may name data files only inside the operator's roots: the campaign's dataset.
            "DISTILL_DATA_ROOTS": str(root / "dataset"),
            # Short leases so that a lost worker is noticed in seconds, not minutes.
            "DISTILL_HEARTBEAT_SECONDS": "1",
            "DISTILL_HEARTBEAT_TIMEOUT_SECONDS": "10",
            "DISTILL_MAX_ATTEMPTS": "3",
            "DISTILL_CANCEL_GRACE_SECONDS": "1",
            # The concurrency scenario keeps 100 jobs of one user queued at once, sent in one burst.
            "DISTILL_MAX_ACTIVE_JOBS_PER_USER": "1000",
            "DISTILL_SUBMIT_LIMIT": "1000/minute",
        }

    def process_env(self) -> dict[str, str]:
        """This process's environment without anything that would point a service process elsewhere."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("DISTILL_")
            and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        }
        return {**env, **self.env}

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            env=self.process_env(),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def start(self) -> None:
        self.postgres.start()
        self.postgres.create_database()
        self.redis.start()
        self.cli("migrate")
        self.token = self.cli("users", "create", "chaos").strip()
        self.start_api()

    def start_api(self) -> None:
        # The same command `distill up` runs for its API; cwd is the campaign's directory so that a
        # developer's .env in the checkout cannot point the service elsewhere.
        self.api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
                "--log-level",
                "warning",
            ],
            env=self.process_env(),
            cwd=self.root,
            stdout=(self.root / "api.log").open("a"),
            stderr=subprocess.STDOUT,
        )

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.api_url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=60, interval=0.2, what="the API to answer /healthz")

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)

    def worker(self, name: str) -> Worker:
        w = Worker(self.root / f"worker-{name}.log", cwd=self.root, environ=self.process_env()).start()
        self.workers.append(w)
        return w

    def stop_workers(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers.clear()

    def stop(self) -> None:
        self.stop_workers()
        if self.api and self.api.poll() is None:
            self.api.send_signal(signal.SIGTERM)
            try:
                self.api.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.api.kill()
        self.redis.kill()
        self.postgres.stop("immediate")

    # -- reading the outcome ------------------------------------------------------------------------

    def sql(self, query: str, *params) -> list[tuple]:
        with psycopg.connect(self.postgres.dsn(), autocommit=True, connect_timeout=5) as conn:
            return conn.execute(query, params).fetchall()

    def claims(self, job_ids: list[str]) -> dict[str, int]:
        """How many times each job was claimed by a worker (each claim writes one such event)."""
        rows = self.sql(
            "SELECT job_id, count(*) FROM job_events WHERE type = 'state' AND message LIKE 'running (attempt %%' "
            "AND job_id = ANY(%s) GROUP BY job_id",
            list(job_ids),
        )
        counts = dict(rows)
        return {job_id: counts.get(job_id, 0) for job_id in job_ids}

    def statuses(self, job_ids: list[str]) -> dict[str, str]:
        return dict(self.sql("SELECT id, status FROM jobs WHERE id = ANY(%s)", list(job_ids)))

    def metric_audit(self, http, job_id: str, total_steps: int) -> dict:
        """The metric series the API serves against what the engine logged: duplicates are (name, step)
        pairs served more than once; missing are pairs some metrics event carried (any attempt) that
        the series lack, plus steps of 1..total_steps without a `loss` point."""
        series = http.get(f"/api/v1/jobs/{job_id}/metrics").json()
        served = Counter((name, point["step"]) for name, points in series.items() for point in points)
        logged = set()
        for (data,) in self.sql("SELECT data FROM job_events WHERE job_id = %s AND type = 'metrics'", job_id):
            logged |= {(name, data["step"]) for name in data["values"]}
        logged |= {("loss", step) for step in range(1, total_steps + 1)}
        return {
            "points": sum(served.values()),
            "duplicate": sum(count - 1 for count in served.values()),
            "missing": len(logged - set(served)),
            "names": len({name for name, _ in logged}),
        }
