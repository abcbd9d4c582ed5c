"""The service on this machine: `distill up` (all of it, embedded) and `distill worker`."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import typer

from app.cli.admin import run_migrations
from distill_client.cli.commands import follow_job, submit_file
from distill_client.cli.core import ExitCode, Failure, api_client, cli


@cli.command()
def worker(
    queues: str = typer.Option("", help="Comma-separated resource classes; default: what this machine can run."),
) -> None:
    """Run a Celery worker: jobs from the queues this machine can serve, each on devices of its own.

    With GPUs it runs as many jobs at once as it has GPUs, on disjoint sets of them; without, one job
    at a time."""
    from app.core.config import get_settings
    from app.reaper import reap_forever
    from worker.celery_app import celery
    from worker.device_leases import inventory

    devices = inventory(get_settings())
    chosen = [q.strip() for q in queues.split(",") if q.strip()] or devices.queues
    # Until Celery installs its own SIGTERM handler (a warm shutdown), a SIGTERM must still end this
    # process through the `finally` below: the default action would leave its queues registered.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # The reaper thread also registers the queues this worker serves, and unregisters them once stopped.
    stop = threading.Event()
    reaper = threading.Thread(target=reap_forever, args=(stop, chosen), daemon=True, name="reaper")
    reaper.start()
    try:
        # A thread per job it may run at once: each thread only supervises its job's processes.
        pool = (
            ["--pool=threads", f"--concurrency={devices.count}"]
            if devices.kind == "gpu"
            else ["--pool=solo", "--concurrency=1"]
        )
        celery.worker_main(
            ["worker", *pool, f"--queues={','.join(chosen)}", "--loglevel=INFO", "--without-gossip", "--without-mingle"]
        )
    finally:
        stop.set()
        reaper.join(timeout=10)


@cli.command()
def up(demo: Path = typer.Option(None, help="Also submit this spec, follow it, and print its results.")) -> None:
    """Run the whole service here: migrate, API, one worker. Ctrl-C stops everything."""
    from app import crud
    from app.core.config import get_settings
    from app.core.db import session_factory
    from app.core.files import write_private

    settings = get_settings()
    run_migrations()
    token_file = settings.data_dir / "token"
    with session_factory()() as session:
        # The token from the last start, while it still signs in: open pages and scripts keep working.
        token = token_file.read_text().strip() if token_file.exists() else ""
        if not (token and crud.user_for_token(session, token)):
            user = crud.user_named(session, "local")
            token = crud.create_token(session, user) if user else crud.create_user(session, "local")[1]
            write_private(token_file, token)
    from worker.supervisor import die_with_parent

    # Each dies with this process, even one killed before it could stop them.
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                settings.host,
                "--port",
                str(settings.port),
                "--log-level",
                "warning",
            ],
            preexec_fn=die_with_parent,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        ),
    ]

    def stop(*_):
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds through the finally below
    url = f"http://{settings.host}:{settings.port}"
    client = api_client(url, token)
    try:
        for _ in range(120):
            try:
                client.http.get("/healthz")
                break
            except Exception:
                time.sleep(0.5)
        typer.echo(f"distill is up: {url}/#token={token}\n(API docs at {url}/docs; the token is also in {token_file})")
        if demo:
            job = follow_job(client, submit_file(client, demo, [], None), verbose=True, out=sys.stdout)
            typer.echo(f"checkpoints on disk: {settings.resolved_artifacts_dir / 'jobs' / job.id / 'checkpoints'}")
            typer.echo(f"\nStill serving {url}/#token={token} — Ctrl-C to stop.")
        while all(p.poll() is None for p in processes):
            time.sleep(1)
        raise Failure("a service process exited; stopping", ExitCode.FAILED)
    except KeyboardInterrupt:
        typer.echo("stopping…")
    finally:
        stop()
