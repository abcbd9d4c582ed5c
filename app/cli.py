"""`distill`: the command line for people and CI.

Server commands (`up`, `worker`, `migrate`, `users create|token|tokens|revoke`) act on this machine's settings;
client commands (`submit`, `jobs`, `status`, `logs`, `cancel`, `download`) talk to the API at
--url / DISTILL_URL with --token / DISTILL_TOKEN. `train` runs a spec here without any service.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import typer

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="Distil large language models into small ones (MiniLLM).")
users = typer.Typer(no_args_is_help=True, help="Manage users and their API tokens.")
cli.add_typer(users, name="users")

UrlOption = typer.Option(None, "--url", envvar="DISTILL_URL", help="API address (default: this machine's server).")
TokenOption = typer.Option(None, "--token", envvar="DISTILL_TOKEN", help="API token (default: the local user's).")


def _client(url: str | None, token: str | None):
    from app.client import Client

    return Client(url, token)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


# -- running without the service ----------------------------------------------------------------


@cli.command()
def train(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job spec, YAML or JSON."),
    output: Path = typer.Option(..., "--output", "-o", help="Run directory: events.jsonl, checkpoints/, resume/."),
) -> None:
    """Run a job spec here, without the service. Resumes from OUTPUT's latest checkpoint if it has one."""
    from worker.engine.checkpoints import best_step, step_dir_name
    from worker.engine.preflight import preflight
    from worker.engine.run import launch_command, run
    from worker.engine.spec import SpecError, load_spec
    from worker.engine.trainer import Cancelled

    try:
        job = load_spec(spec)
    except SpecError as err:
        raise _fail(f"{spec}: {err}", 2) from None
    problems = preflight(job)  # the checks the API runs at submit, before anything is loaded
    if problems:
        raise _fail(f"{spec}: " + "; ".join(f"{'.'.join(loc)}: {message}" for loc, message in problems), 2)
    output.mkdir(parents=True, exist_ok=True)
    if job.resources.devices > 1 and "LOCAL_RANK" not in os.environ:
        raise typer.Exit(subprocess.call(launch_command(job, spec, output)))
    try:
        scores = run(spec, output)
    except Cancelled as stop:
        typer.echo(f"cancelled {stop.what}; checkpoints in {output / 'checkpoints'}")
        raise typer.Exit(130) from None
    except Exception as err:  # reported in events.jsonl too
        raise _fail(f"{type(err).__name__}: {err}") from None
    typer.echo(score_table(scores))
    best = best_step(output)
    typer.echo(f"checkpoints: {output / 'checkpoints'}" + (f" (best: {step_dir_name(best)})" if best is not None else ""))


def score_table(scores: dict[str, dict[str, float]]) -> str:
    metrics = sorted({k for s in scores.values() for k in s})
    rows = [["model", *metrics]] + [[label, *(f"{s[m]:.3f}" if m in s else "-" for m in metrics)] for label, s in scores.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


# -- server side --------------------------------------------------------------------------------


@cli.command()
def migrate() -> None:
    """Bring the database schema up to date (alembic upgrade head)."""
    _migrate()


def _migrate() -> None:
    from alembic import command
    from alembic.config import Config

    from worker.engine.paths import PROJECT_ROOT

    command.upgrade(Config(str(PROJECT_ROOT / "alembic.ini")), "head")


EXPIRES = typer.Option(None, "--expires-days", min=1, help="The token stops working after this many days (default: until revoked).")


def _expiry(days: int | None):
    from datetime import timedelta

    return timedelta(days=days) if days else None


@users.command("create")
def users_create(name: str, expires_days: int | None = EXPIRES) -> None:
    """Create a user and print their API token (shown only this once)."""
    from app import crud
    from app.core.db import session_factory

    with session_factory()() as session:
        _user, token = crud.create_user(session, name, _expiry(expires_days))
    typer.echo(token)


@users.command("token")
def users_token(name: str, expires_days: int | None = EXPIRES) -> None:
    """Print a new API token for an existing user (shown only this once); their other tokens stay valid."""
    from app import crud
    from app.core.db import session_factory
    from app.models import User
    from sqlalchemy import select

    with session_factory()() as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            raise typer.BadParameter(f"no user {name!r}", param_hint="NAME")
        typer.echo(crud.create_token(session, user, _expiry(expires_days)))


@users.command("tokens")
def users_tokens(name: str) -> None:
    """List a user's tokens: id, created, expires, revoked (the tokens themselves are never stored)."""
    from app import crud
    from app.core.db import session_factory

    with session_factory()() as session:
        tokens = crud.tokens_of(session, name)
    if tokens is None:
        raise typer.BadParameter(f"no user {name!r}", param_hint="NAME")
    typer.echo(f"{'id':>6}  {'created':<20} {'expires':<20} revoked")
    for t in tokens:
        stamp = lambda d: d.strftime("%Y-%m-%d %H:%M:%S") if d else "-"  # noqa: E731
        typer.echo(f"{t.id:>6}  {stamp(t.created_at):<20} {stamp(t.expires_at):<20} {stamp(t.revoked_at)}")


@users.command("revoke")
def users_revoke(token_id: int) -> None:
    """Revoke a token by the id `distill users tokens` shows; it stops working at once."""
    from app import crud
    from app.core.db import session_factory

    with session_factory()() as session:
        if not crud.revoke_token(session, token_id):
            raise typer.BadParameter(f"no live token with id {token_id}", param_hint="TOKEN_ID")
    typer.echo(f"revoked token {token_id}")


def _worker_queues() -> list[str]:
    from app.core.config import get_settings

    gpus = 0
    if shutil.which("nvidia-smi"):  # counted without importing torch: no CUDA state in the worker
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        gpus = sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))
    if gpus:
        return [f"gpu-{n}" for n in range(1, gpus + 1)]
    return [f"cpu-{n}" for n in range(1, get_settings().worker_cpu_processes + 1)]


@cli.command()
def worker(
    queues: str = typer.Option("", help="Comma-separated resource classes; default: what this machine can run."),
) -> None:
    """Run a Celery worker that takes one job at a time from the queues this machine can serve."""
    from worker.celery_app import celery
    from worker.reaper import reap_forever

    threading.Thread(target=reap_forever, args=(threading.Event(),), daemon=True, name="reaper").start()
    chosen = queues or ",".join(_worker_queues())
    celery.worker_main(["worker", "--pool=solo", "--concurrency=1", f"--queues={chosen}", "--loglevel=INFO",
                        "--without-gossip", "--without-mingle"])  # fmt: skip


@cli.command()
def up(
    demo: Path = typer.Option(None, help="Also submit this spec, follow it, and print its results."),
) -> None:
    """Run the whole service here: migrate, API, one worker. Ctrl-C stops everything."""
    from app import crud
    from app.core.config import get_settings
    from app.core.db import session_factory
    from app.core.files import write_private
    from app.models import User
    from sqlalchemy import select

    settings = get_settings()
    _migrate()
    token_file = settings.data_dir / "token"
    with session_factory()() as session:
        # The token from the last start, while it still signs in: open pages and scripts keep working.
        token = token_file.read_text().strip() if token_file.exists() else ""
        if not (token and crud.user_for_token(session, token)):
            user = session.scalar(select(User).where(User.name == "local"))
            token = crud.create_token(session, user) if user else crud.create_user(session, "local")[1]
            write_private(token_file, token)
    processes = [
        subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--host", settings.host, "--port", str(settings.port),
                          "--log-level", "warning"]),  # fmt: skip
        subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
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
    client = _client(url, token)
    try:
        for _ in range(120):
            try:
                client.http.get("/healthz")
                break
            except Exception:
                time.sleep(0.5)
        typer.echo(f"distill is up: {url}/#token={token}\n(API docs at {url}/docs; the token is also in {token_file})")
        if demo:
            job = _submit_and_follow(client, demo, follow=True, idempotency_key=None)
            typer.echo(f"checkpoints on disk: {settings.resolved_artifacts_dir / 'jobs' / job['id'] / 'checkpoints'}")
            typer.echo(f"\nStill serving {url}/#token={token} — Ctrl-C to stop.")
        while all(p.poll() is None for p in processes):
            time.sleep(1)
        raise _fail("a service process exited; stopping")
    except KeyboardInterrupt:
        typer.echo("stopping…")
    finally:
        stop()


# -- client side --------------------------------------------------------------------------------


def _upload_local_data(client, spec: dict, base: Path) -> dict:
    """Local data files in the spec are uploaded, so the server never needs this machine's paths."""
    from worker.engine.spec import DATA_FILES

    data = dict(spec.get("data", {}))
    for key in DATA_FILES:
        value = data.get(key)
        if isinstance(value, str) and not value.startswith(("builtin:", "dataset:")):
            path = Path(value) if Path(value).is_absolute() or Path(value).exists() else base / value
            if path.is_file():
                content = None
                if key == "pretrain" and path.suffix not in (".jsonl", ".json"):  # uploads are JSONL: one document
                    content = (json.dumps({"text": path.read_text(encoding="utf-8")}) + "\n").encode()
                data[key] = f"dataset:{client.upload_dataset(path, content)['id']}"
    return {**spec, "data": data}


def _submit_and_follow(client, spec_path: Path, follow: bool, idempotency_key: str | None) -> dict:
    from app.client import load_spec_file

    spec = _upload_local_data(client, load_spec_file(spec_path), spec_path.parent)
    job = client.submit(spec, idempotency_key)
    typer.echo(f"submitted {job['id']} ({job['name']}, {job['status']})")
    return _follow(client, job["id"], verbose=follow)


def _follow(client, job_id: str, verbose: bool) -> dict:
    from tqdm import tqdm

    bar = None
    for event in client.events(job_id, follow=True):
        if event["type"] == "metrics":
            values = event["data"]["values"]
            if bar is None:
                bar = tqdm(total=client.get(f"/jobs/{job_id}")["progress"]["total_steps"], unit="step")
            bar.n = event["data"]["step"]
            bar.set_postfix({k: f"{values[k]:.3g}" for k in ("loss", "reward", "reverse_kl", "lr") if k in values})
        elif verbose and event["message"]:
            (bar.write if bar else typer.echo)(f"[{event['type']}] {event['message']}")
    if bar:
        bar.close()
    job = client.get(f"/jobs/{job_id}")
    evals = client.get(f"/jobs/{job_id}/evals")
    tests = {e["label"]: e["scores"] for e in evals if e["label"] != "selection"}  # test set: teacher, initial, final, best
    if tests:
        typer.echo(score_table(tests))
    checkpoints = client.get(f"/jobs/{job_id}/checkpoints")
    if checkpoints:
        best = next(c for c in checkpoints if c["best"])
        typer.echo(f"best checkpoint: step {best['step']}; download with: distill download {job_id} --step best -o DIR")
    typer.echo(f"{job_id}: {job['status']}" + (f" ({job['error']['code']}: {job['error']['message']})" if job["error"] else ""))
    return job


@cli.command()
def submit(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job to end; exit 0 only if it succeeded."),
    follow: bool = typer.Option(False, "--follow", help="Like --wait, printing events as they come."),
    idempotency_key: str = typer.Option(None, help="Retrying with the same key never creates a second job."),
    url: str = UrlOption,
    token: str = TokenOption,
) -> None:
    """Submit a job spec. Local data files in it are uploaded first."""
    from app.client import ApiError, load_spec_file

    client = _client(url, token)
    try:
        if wait or follow:
            job = _submit_and_follow(client, spec, follow, idempotency_key)
            raise typer.Exit(0 if job["status"] == "succeeded" else 1)
        job = client.submit(_upload_local_data(client, load_spec_file(spec), spec.parent), idempotency_key)
    except ApiError as err:
        raise _fail(str(err), 2 if err.status_code in (409, 422) else 1) from None
    typer.echo(job["id"])


@cli.command()
def jobs(status: str = typer.Option(None), limit: int = 20, url: str = UrlOption, token: str = TokenOption) -> None:
    """List jobs, newest first."""
    page = _client(url, token).get("/jobs", limit=limit, **({"status": status} if status else {}))
    for job in page["data"]:
        p = job["progress"]
        typer.echo(f"{job['id']}  {job['status']:<10} {p['step']:>6}/{p['total_steps']:<6} {job['name']}")


@cli.command()
def status(job_id: str, url: str = UrlOption, token: str = TokenOption) -> None:
    """Print a job as JSON."""
    typer.echo(json.dumps(_client(url, token).get(f"/jobs/{job_id}"), indent=2))


@cli.command()
def logs(job_id: str, follow: bool = typer.Option(False, "-f", "--follow"), url: str = UrlOption, token: str = TokenOption) -> None:
    """Print a job's events (with -f, until it ends)."""
    for event in _client(url, token).events(job_id, follow):
        if event["message"]:
            typer.echo(f"{event['created_at']}  {event['level']:<7} {event['type']:<10} {event['message']}")


@cli.command()
def cancel(job_id: str, url: str = UrlOption, token: str = TokenOption) -> None:
    """Cancel a job: at once if queued, at its next step if running."""
    typer.echo(_client(url, token).post(f"/jobs/{job_id}/cancel")["status"])


@cli.command()
def download(
    job_id: str,
    step: str = typer.Option("latest", help="A step number, latest or best."),
    output: Path = typer.Option(..., "--output", "-o"),
    url: str = UrlOption,
    token: str = TokenOption,
) -> None:
    """Download a checkpoint (resuming a broken download), check its SHA-256, unpack it."""
    typer.echo(_client(url, token).download(job_id, step, output))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
