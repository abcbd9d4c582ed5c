"""`distill`: the command line for people and CI.

Server commands (`up`, `worker`, `migrate`, `users create|token|tokens|revoke`, `keys rotate|list|retire`)
act on this machine's settings; client commands (`submit`, `validate`, `jobs`, `status`, `logs`, `cancel`,
`download`, `checkpoints`, `evals`, `datasets`) talk to the API at --url / DISTILL_URL with --token /
DISTILL_TOKEN through app/client.py. `train` runs a spec here without any service.

Every command that prints takes --json: one JSON document on stdout. Every error is one line on stderr
(with --json, a JSON document) and an exit code of its kind (ExitCode), from one handler (_Commands).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import typer
from typer.core import TyperGroup

from worker.engine.status import JobStatus

if TYPE_CHECKING:
    from app.client import Client
    from app.schemas import JobOut


class ExitCode(IntEnum):
    """What `distill` exits with; EXIT_CODES says what each means."""

    OK = 0
    FAILED = 1
    USAGE = 2
    CANCELLED = 3
    NOT_FOUND = 4
    UNAVAILABLE = 5
    UNAUTHORIZED = 6


# The same table is in README.md (tests/service/test_cli.py compares them).
EXIT_CODES = {
    ExitCode.OK: "done; with --wait or --follow, the job succeeded",
    ExitCode.FAILED: "the job failed, or the command did (a file it could not write, say)",
    ExitCode.USAGE: "bad usage or a bad spec: an option, a spec the server refuses (422), an Idempotency-Key "
    "used before with another spec (409), a user name that exists",
    ExitCode.CANCELLED: "the job was cancelled",
    ExitCode.NOT_FOUND: "no such job, checkpoint, user, token or key",
    ExitCode.UNAVAILABLE: "the server unreachable or failing (connection refused, timeouts, 5xx) after retrying, "
    "a limit reached (429), or a download that arrived broken: try again later",
    ExitCode.UNAUTHORIZED: "no token, or one that is wrong, expired or revoked (401, 403)",
}
# A job's final status as the exit code of a command that waited for it.
OUTCOMES = {
    JobStatus.SUCCEEDED: ExitCode.OK,
    JobStatus.FAILED: ExitCode.FAILED,
    JobStatus.CANCELLED: ExitCode.CANCELLED,
}


class Failure(Exception):
    """A command's error: one line for people, and the exit code of its kind."""

    def __init__(self, message: str, code: ExitCode):
        super().__init__(message)
        self.code = code


class _Commands(TyperGroup):
    """Runs every command under one error handler. A known error becomes one line on stderr (with
    --json, a JSON document) and its exit code; anything else is a bug, whose traceback typer prints
    without local variables (they would show the token in CI logs)."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except typer.TyperException as err:  # click's usage errors: typer shows them with the usage line
            if not ctx.meta.get("json"):
                raise
            _report(True, err.format_message(), err.exit_code, {})
        except Exception as err:
            known = _known(err)
            if known is None:
                raise
            _report(ctx.meta.get("json", False), *known)


def _known(err: Exception) -> tuple[str, ExitCode, dict] | None:
    """A known error's message, exit code and, for --json, details; None for anything else."""
    import httpx

    from app.client import ApiError, ChecksumMismatch, SpecFileError

    if isinstance(err, Failure):
        return str(err), err.code, {}
    if isinstance(err, ApiError):
        by_status = {
            401: ExitCode.UNAUTHORIZED,
            403: ExitCode.UNAUTHORIZED,
            404: ExitCode.NOT_FOUND,
            429: ExitCode.UNAVAILABLE,
        }
        code = by_status.get(err.status_code, ExitCode.UNAVAILABLE if err.status_code >= 500 else ExitCode.USAGE)
        return str(err), code, {"status_code": err.status_code, "detail": err.detail}
    if isinstance(err, (httpx.InvalidURL, httpx.UnsupportedProtocol)):
        return f"bad API address (--url, DISTILL_URL): {err}", ExitCode.USAGE, {}
    if isinstance(err, httpx.TransportError):  # what is left after the client's retries
        return f"cannot reach {err.request.url}: {type(err).__name__}: {err}", ExitCode.UNAVAILABLE, {}
    if isinstance(err, ChecksumMismatch):
        return str(err), ExitCode.UNAVAILABLE, {}
    if isinstance(err, SpecFileError):
        return str(err), ExitCode.USAGE, {}
    if isinstance(err, OSError):
        return str(err), ExitCode.FAILED, {}
    return None


def _report(as_json: bool, message: str, code: int, details: dict) -> None:
    document = json.dumps({"error": message, "exit_code": int(code), **details})  # one line, whole in any CI log
    typer.echo(document if as_json else f"error: {message}", err=True)
    raise typer.Exit(code)


cli = typer.Typer(
    cls=_Commands,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Distil large language models into small ones (MiniLLM).",
    epilog="Exit codes:\n\n" + "\n\n".join(f"{int(c)}  {meaning}" for c, meaning in EXIT_CODES.items()),
)
users = typer.Typer(no_args_is_help=True, help="Manage users, their API tokens and webhooks.")
cli.add_typer(users, name="users")
keys = typer.Typer(no_args_is_help=True, help="Manage the keys that sign download links.")
cli.add_typer(keys, name="keys")


def _errors_as_json(ctx: typer.Context, value: bool) -> bool:
    """--json turns errors into JSON too: noted where _Commands sees it (all contexts share `meta`)."""
    ctx.meta["json"] = value
    return value


UrlOption = typer.Option(None, "--url", envvar="DISTILL_URL", help="API address (default: this machine's server).")
TokenOption = typer.Option(None, "--token", envvar="DISTILL_TOKEN", help="API token (default: the local user's).")
JsonOption = typer.Option(
    False,
    "--json",
    is_eager=True,
    callback=_errors_as_json,
    help="Print one JSON document on stdout (an error: one on stderr).",
)
ClearWebhookOption = typer.Option(False, "--clear", help="Remove the default webhook URL.")
NewSecretOption = typer.Option(
    False, "--new-secret", help="Make a new signing secret; the old one stops signing at once."
)
SetOption = typer.Option(
    [],
    "--set",
    metavar="PATH=VALUE",
    help="Set a spec field, e.g. --set training.steps=200 (repeatable; VALUE is read as YAML).",
)


def _json(document) -> str:
    """`document` (pydantic models, lists and dicts of them, paths, datetimes) as indented JSON."""
    from pydantic_core import to_json

    return to_json(document, indent=2).decode()


def _emit(as_json: bool, document, text: str) -> None:
    """A command's result on stdout: `document` as JSON with --json, else `text` for people."""
    typer.echo(_json(document) if as_json else text)


def _client(url: str | None, token: str | None) -> Client:
    """The API at --url / DISTILL_URL with --token / DISTILL_TOKEN; by default this machine's server,
    and the local user's token that `distill up` saved. Failed requests are retried for
    DISTILL_RETRY_SECONDS (300 by default: a server restarting while a CI step waits for its job)."""
    from app.client import Client
    from app.core.config import Settings

    settings = Settings()  # not get_settings(), which makes the data folder: a client command leaves none behind
    saved = settings.data_dir / "token"
    if not token and saved.exists():
        token = saved.read_text().strip()
    try:
        retry_seconds = float(os.environ.get("DISTILL_RETRY_SECONDS", "300"))
    except ValueError:
        raise Failure("DISTILL_RETRY_SECONDS must be a number of seconds", ExitCode.USAGE) from None
    return Client(url or f"http://{settings.host}:{settings.port}", token, retry_seconds=retry_seconds)


# -- running without the service ----------------------------------------------------------------


@cli.command()
def train(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job spec, YAML or JSON."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Run directory: spec.json, events.jsonl, checkpoints/, resume/."
    ),
    overrides: list[str] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Run a job spec here, without the service. Resumes from OUTPUT's latest checkpoint if it has one."""
    from app.client import load_spec_file
    from worker.engine.checkpoints import best_step, step_dir_name
    from worker.engine.preflight import preflight
    from worker.engine.run import launch_command, run
    from worker.engine.spec import SpecError, parse_spec
    from worker.engine.trainer import Cancelled

    data = load_spec_file(spec, overrides)
    try:
        job = parse_spec(data)
    except SpecError as err:
        raise Failure(f"{spec}: {err}", ExitCode.USAGE) from None
    problems = preflight(job)  # the checks the API runs at submit, before anything is loaded
    if problems:
        raise Failure(
            f"{spec}: " + "; ".join(f"{'.'.join(loc)}: {message}" for loc, message in problems), ExitCode.USAGE
        )
    output.mkdir(parents=True, exist_ok=True)
    ran = output / "spec.json"  # what runs, overrides applied, kept with the run
    ran.write_text(json.dumps(data, indent=2))
    # With --json, stdout is the summary alone: the run's messages go to stderr (and events.jsonl).
    if job.resources.devices > 1 and "LOCAL_RANK" not in os.environ:
        raise typer.Exit(subprocess.call(launch_command(job, ran, output), stdout=sys.stderr if as_json else None))
    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            scores = run(ran, output)
    except Cancelled as stop:
        raise Failure(f"cancelled {stop.what}; checkpoints in {output / 'checkpoints'}", ExitCode.CANCELLED) from None
    except Exception as err:  # reported in events.jsonl too
        raise Failure(f"{type(err).__name__}: {err}", ExitCode.FAILED) from None
    best = best_step(output)
    where = f"checkpoints: {output / 'checkpoints'}" + (f" (best: {step_dir_name(best)})" if best is not None else "")
    _emit(as_json, {"output": output, "scores": scores, "best_step": best}, f"{score_table(scores)}\n{where}")


def score_table(scores: dict[str, dict[str, float]]) -> str:
    metrics = sorted({k for s in scores.values() for k in s})
    rows = [["model", *metrics]] + [
        [label, *(f"{s[m]:.3f}" if m in s else "-" for m in metrics)] for label, s in scores.items()
    ]
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


EXPIRES = typer.Option(
    None, "--expires-days", min=1, help="The token stops working after this many days (default: until revoked)."
)


def _expiry(days: int | None):
    from datetime import timedelta

    return timedelta(days=days) if days else None


@users.command("create")
def users_create(name: str, expires_days: int | None = EXPIRES, as_json: bool = JsonOption) -> None:
    """Create a user and print their API token (shown only this once)."""
    from app import crud
    from app.core.db import session_factory

    with session_factory()() as session:
        try:
            _user, token = crud.create_user(session, name, _expiry(expires_days))
        except crud.NameTaken:
            raise Failure(
                f"a user named {name!r} exists; `distill users token {name}` gives them another token", ExitCode.USAGE
            ) from None
    _emit(as_json, {"name": name, "token": token}, token)


@users.command("token")
def users_token(name: str, expires_days: int | None = EXPIRES, as_json: bool = JsonOption) -> None:
    """Print a new API token for an existing user (shown only this once); their other tokens stay valid."""
    from app import crud
    from app.core.db import session_factory

    with session_factory()() as session:
        user = crud.user_named(session, name)
        if user is None:
            raise Failure(f"no user {name!r}", ExitCode.NOT_FOUND)
        token = crud.create_token(session, user, _expiry(expires_days))
    _emit(as_json, {"name": name, "token": token}, token)


@users.command("tokens")
def users_tokens(name: str, as_json: bool = JsonOption) -> None:
    """List a user's tokens: id, created, expires, revoked (the tokens themselves are never stored)."""
    from app import crud
    from app.core.db import session_factory

    with session_factory()() as session:
        tokens = crud.tokens_of(session, name)
    if tokens is None:
        raise Failure(f"no user {name!r}", ExitCode.NOT_FOUND)
    stamp = lambda d: d.strftime("%Y-%m-%d %H:%M:%S") if d else "-"  # noqa: E731
    rows = [f"{t.id:>6}  {stamp(t.created_at):<20} {stamp(t.expires_at):<20} {stamp(t.revoked_at)}" for t in tokens]
    _emit(
        as_json,
        [
            {"id": t.id, "created_at": t.created_at, "expires_at": t.expires_at, "revoked_at": t.revoked_at}
            for t in tokens
        ],
        "\n".join([f"{'id':>6}  {'created':<20} {'expires':<20} revoked", *rows]),
    )


@users.command("revoke")
def users_revoke(token_id: int, as_json: bool = JsonOption) -> None:
    """Revoke a token by the id `distill users tokens` shows; it stops working at once."""
    from app import crud
    from app.core.db import session_factory

    with session_factory()() as session:
        if not crud.revoke_token(session, token_id):
            raise Failure(f"no live token with id {token_id}", ExitCode.NOT_FOUND)
    _emit(as_json, {"revoked": token_id}, f"revoked token {token_id}")


def _webhook_text(url: str | None, secret: str | None) -> str:
    """A default webhook as `distill webhook` and `distill users webhook` print it; the secret only when just made."""
    return f"webhook: {url or '(none)'}" + (f"\nsigning secret (shown only now): {secret}" if secret else "")


@users.command("webhook")
def users_webhook(
    name: str,
    url: str | None = typer.Argument(
        None, help="Where the user's jobs report their end (a spec's notify.webhook_url overrides it)."
    ),
    clear: bool = ClearWebhookOption,
    new_secret: bool = NewSecretOption,
    as_json: bool = JsonOption,
) -> None:
    """Set a user's default webhook URL; without URL, show it. Prints the signing secret when one is
    made (the first time, or with --new-secret): the receiver checks each message with it."""
    from pydantic import ValidationError

    from app import crud, webhooks
    from app.core.config import get_settings
    from app.core.db import session_factory
    from worker.engine.spec import NotifySpec

    if url is not None:
        try:
            NotifySpec(webhook_url=url)
        except ValidationError as err:
            raise Failure(f"{url}: {err.errors()[0]['msg'].removeprefix('Value error, ')}", ExitCode.USAGE) from None
        if problem := webhooks.url_problem(url, get_settings()):
            raise Failure(problem, ExitCode.USAGE)
    with session_factory()() as session:
        user = crud.user_named(session, name)
        if user is None:
            raise Failure(f"no user {name!r}", ExitCode.NOT_FOUND)
        secret = (
            webhooks.set_user_webhook(session, user, url, clear=clear, rotate=new_secret)
            if (url or clear or new_secret)
            else None
        )
        shown = {"name": name, "webhook_url": user.webhook_url, **({"secret": secret} if secret else {})}
    _emit(as_json, shown, _webhook_text(user.webhook_url, secret))


@keys.command("rotate")
def keys_rotate(as_json: bool = JsonOption) -> None:
    """Create a new key that signs links from now on; links signed by older keys keep working until retired."""
    from app.core import signing_keys

    try:
        kid = signing_keys.rotate()
    except signing_keys.KeysFromSetting as err:
        raise Failure(str(err), ExitCode.FAILED) from None
    _emit(as_json, {"kid": kid}, kid)


@keys.command("list")
def keys_list(as_json: bool = JsonOption) -> None:
    """List the accepted keys: id, created, and the one that signs (the secrets are never shown)."""
    from app.core import signing_keys

    accepted = signing_keys.all_keys()  # the first signs
    stamp = lambda d: d.strftime("%Y-%m-%d %H:%M:%S") if d else "-"  # noqa: E731
    rows = [
        f"{key.kid:<24} {stamp(key.created):<20} {'yes' if n == 0 else ''}".rstrip() for n, key in enumerate(accepted)
    ]
    _emit(
        as_json,
        [{"kid": key.kid, "created": key.created, "signs": n == 0} for n, key in enumerate(accepted)],
        "\n".join([f"{'id':<24} {'created':<20} signs", *rows]),
    )


@keys.command("retire")
def keys_retire(kid: str, as_json: bool = JsonOption) -> None:
    """Stop accepting links signed by key KID, at once; rotate first if it is the key that signs."""
    from app.core import signing_keys

    try:
        signing_keys.retire(kid)
    except signing_keys.KeysFromSetting as err:
        raise Failure(str(err), ExitCode.FAILED) from None
    except LookupError as err:
        raise Failure(str(err), ExitCode.NOT_FOUND) from None
    except ValueError as err:
        raise Failure(str(err), ExitCode.USAGE) from None
    _emit(as_json, {"retired": kid}, f"retired key {kid}")


@cli.command()
def worker(
    queues: str = typer.Option("", help="Comma-separated resource classes; default: what this machine can run."),
) -> None:
    """Run a Celery worker: jobs from the queues this machine can serve, each on devices of its own.

    With GPUs it runs as many jobs at once as it has GPUs, on disjoint sets of them; without, one job
    at a time."""
    from app.core.config import get_settings
    from app.device_leases import inventory
    from app.reaper import reap_forever
    from worker.celery_app import celery

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
    _migrate()
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
            job = _follow(client, _submit(client, demo, [], None), verbose=True, out=sys.stdout)
            typer.echo(f"checkpoints on disk: {settings.resolved_artifacts_dir / 'jobs' / job.id / 'checkpoints'}")
            typer.echo(f"\nStill serving {url}/#token={token} — Ctrl-C to stop.")
        while all(p.poll() is None for p in processes):
            time.sleep(1)
        raise Failure("a service process exited; stopping", ExitCode.FAILED)
    except KeyboardInterrupt:
        typer.echo("stopping…")
    finally:
        stop()


# -- client side --------------------------------------------------------------------------------


def _upload_local_data(client: Client, spec: dict, base: Path) -> dict:
    """Local data files in the spec are uploaded, so the server never needs this machine's paths. A
    file uploaded before (same name, same bytes) is used again: a repeated submit then sends the same
    spec, which its Idempotency-Key needs, and stores nothing twice."""
    from worker.engine.spec import DATA_FILES

    data, uploads = spec.get("data"), None
    if not isinstance(data, dict):
        return spec  # nothing to upload; the server says what is wrong with it
    data = dict(data)
    for key in DATA_FILES:
        value = data.get(key)
        if isinstance(value, str) and not value.startswith(("builtin:", "dataset:")):
            path = Path(value) if Path(value).is_absolute() or Path(value).exists() else base / value
            if path.is_file():
                content = path.read_bytes()
                if key == "pretrain" and path.suffix not in (".jsonl", ".json"):  # uploads are JSONL: one document
                    content = (json.dumps({"text": content.decode("utf-8")}) + "\n").encode()
                if uploads is None:
                    uploads = {(d.name, d.sha256): d.id for d in client.datasets.list()}
                found = uploads.get((path.name, hashlib.sha256(content).hexdigest()))
                data[key] = f"dataset:{found or client.datasets.upload(path, content).id}"
    return {**spec, "data": data}


def _submit(client: Client, spec_path: Path, overrides: list[str], idempotency_key: str | None) -> JobOut:
    from app.client import load_spec_file

    return client.jobs.create(
        _upload_local_data(client, load_spec_file(spec_path, overrides), spec_path.parent), idempotency_key
    )


def _follow(client: Client, job: JobOut, verbose: bool, out: TextIO) -> JobOut:
    """A job just submitted, once it has ended, shown on the way: where it is queued, a progress bar
    (on stderr), with `verbose` its events, then its scores, best checkpoint and outcome as lines on `out`."""
    from tqdm import tqdm

    typer.echo(f"submitted {job.id} ({job.name}, {job.status})", file=out)
    _say_where_queued(job)
    bar = None
    for event in client.jobs.events(job.id, follow=True):
        if event.type == "metrics":
            values = event.data["values"]
            if bar is None:
                bar = tqdm(total=client.jobs.retrieve(job.id).progress.total_steps, unit="step")
            bar.n = event.data["step"]
            bar.set_postfix({k: f"{values[k]:.3g}" for k in ("loss", "reward", "reverse_kl", "lr") if k in values})
        elif verbose and event.message:
            tqdm.write(f"[{event.type}] {event.message}", file=out)
    if bar:
        bar.close()
    job = client.jobs.retrieve(job.id)
    tests = {
        e.label: e.scores for e in client.jobs.evals(job.id) if e.label != "selection"
    }  # teacher, initial, final, best
    if tests:
        typer.echo(score_table(tests), file=out)
    best = next((c for c in client.checkpoints.list(job.id) if c.best), None)
    if best:
        typer.echo(
            f"best checkpoint: step {best.step}; download with: distill download {job.id} --step best -o DIR", file=out
        )
    typer.echo(f"{job.id}: {job.status}" + (f" ({job.error.code}: {job.error.message})" if job.error else ""), file=out)
    return job


@cli.command()
def submit(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job spec, YAML or JSON."),
    overrides: list[str] = SetOption,
    wait: bool = typer.Option(False, "--wait", help="Wait for the job to end; the exit code says how it ended."),
    follow: bool = typer.Option(False, "--follow", help="Like --wait, printing events as they come."),
    idempotency_key: str = typer.Option(
        None,
        help="Retrying with the same key never creates a second job "
        "(without one, a fresh key covers this command's own retries).",
    ),
    as_json: bool = JsonOption,
    url: str = UrlOption,
    token: str = TokenOption,
) -> None:
    """Submit a job spec; print its id (with --json, the job). Local data files in it are uploaded first."""
    client = _client(url, token)
    job = _submit(client, spec, overrides, idempotency_key)
    if not (wait or follow):
        _emit(as_json, job, job.id)
        _say_where_queued(job)
        return
    job = _follow(client, job, verbose=follow, out=sys.stderr if as_json else sys.stdout)  # stdout: the JSON alone
    if as_json:
        typer.echo(_json(job))
    raise typer.Exit(OUTCOMES[job.status])


@cli.command()
def validate(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job spec, YAML or JSON."),
    overrides: list[str] = SetOption,
    as_json: bool = JsonOption,
    url: str = UrlOption,
    token: str = TokenOption,
) -> None:
    """Check a spec with the server's full check, as submit would, and queue nothing.

    Fields, paths, models, data and shapes are checked; the spec is printed as a job would store it
    (with --json; defaults filled in). Local data files in it are uploaded, as submit does (submit
    then uses those uploads)."""
    from app.client import load_spec_file

    client = _client(url, token)
    checked = client.jobs.validate(_upload_local_data(client, load_spec_file(spec, overrides), spec.parent))
    _emit(as_json, checked, f"{spec}: valid")


@cli.command()
def jobs(
    status: str = typer.Option(None, help="Only jobs in this status."),
    limit: int = typer.Option(20, min=1, help="How many, newest first."),
    as_json: bool = JsonOption,
    url: str = UrlOption,
    token: str = TokenOption,
) -> None:
    """List jobs, newest first."""
    listed = list(itertools.islice(_client(url, token).jobs.list(status=status, page_size=min(limit, 100)), limit))
    rows = [f"{j.id}  {j.status:<10} {j.progress.step:>6}/{j.progress.total_steps:<6} {j.name}" for j in listed]
    _emit(as_json, listed, "\n".join(rows))


@cli.command()
def status(job_id: str, as_json: bool = JsonOption, url: str = UrlOption, token: str = TokenOption) -> None:
    """Print a job as JSON (with or without --json; while it is queued, its place in the queue on stderr)."""
    job = _client(url, token).jobs.retrieve(job_id)
    typer.echo(_json(job))
    _say_where_queued(job)


def _say_where_queued(job: JobOut) -> None:
    """A queued job's place in its queue, and what it waits for if no worker serves that queue; on
    stderr, so that stdout stays the job id or JSON that scripts read."""
    if job.status != JobStatus.QUEUED:
        return
    typer.echo(f"queued on {job.queue}: {job.queue_position} job(s) ahead", err=True)
    if job.waiting_for:
        typer.echo(f"warning: {job.waiting_for}", err=True)


@cli.command()
def logs(
    job_id: str,
    follow: bool = typer.Option(False, "-f", "--follow", help="Go on until the job has ended."),
    raw: bool = typer.Option(False, "--raw", help="Print what the training process printed instead of the events."),
    attempt: int | None = typer.Option(None, min=1, help="With --raw: this attempt's output (default: the latest)."),
    tail: int | None = typer.Option(None, min=1, help="With --raw: only its last N lines."),
    as_json: bool = JsonOption,
    url: str = UrlOption,
    token: str = TokenOption,
) -> None:
    """Print a job's events (with --json, all of them as one list, once read); with --raw, the
    training process's own output (the API answers at most its last 4 MiB)."""
    if raw:
        if follow:
            raise Failure("--raw prints the log as it is now; --follow follows the events", ExitCode.USAGE)
        text = _client(url, token).jobs.log(job_id, attempt, tail)
        if as_json:
            typer.echo(_json({"log": text}))
        else:
            typer.echo(text, nl=False)
        return
    events = _client(url, token).jobs.events(job_id, follow)
    if as_json:
        typer.echo(_json(list(events)))
        return
    for event in events:
        if event.message:
            typer.echo(f"{event.created_at:%Y-%m-%d %H:%M:%S}  {event.level:<7} {event.type:<10} {event.message}")


@cli.command()
def cancel(job_id: str, as_json: bool = JsonOption, url: str = UrlOption, token: str = TokenOption) -> None:
    """Cancel a job: at once if queued, at its next step if running. Print its status (an ended job's, as it is)."""
    job = _client(url, token).jobs.cancel(job_id)
    _emit(as_json, job, job.status)


@cli.command()
def download(
    job_id: str,
    step: str = typer.Option("latest", help="A step number, latest or best."),
    output: Path = typer.Option(..., "--output", "-o"),
    as_json: bool = JsonOption,
    url: str = UrlOption,
    token: str = TokenOption,
) -> None:
    """Download a checkpoint (resuming a broken download), check its SHA-256, unpack it; print the model directory."""
    from tqdm import tqdm

    with tqdm(unit="B", unit_scale=True, desc="download") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        model_dir = _client(url, token).checkpoints.download(job_id, step, output, progress)
    _emit(as_json, {"path": model_dir}, str(model_dir))


@cli.command()
def checkpoints(job_id: str, as_json: bool = JsonOption, url: str = UrlOption, token: str = TokenOption) -> None:
    """List a job's checkpoints: step, archive size, SHA-256, and which are latest and best."""
    listed = _client(url, token).checkpoints.list(job_id)
    marks = [" ".join(m for m in ("latest", "best") if getattr(c, m)) for c in listed]
    rows = [f"{c.step:>8}  {c.archive_size:>12}  {c.archive_sha256}  {m}" for c, m in zip(listed, marks)]
    _emit(as_json, listed, "\n".join([f"{'step':>8}  {'bytes':>12}  {'sha256':<64}  marks", *rows]).rstrip())


@cli.command()
def evals(job_id: str, as_json: bool = JsonOption, url: str = UrlOption, token: str = TokenOption) -> None:
    """Print a job's evaluation scores: the selection set at each step, then the test set's table."""
    listed = _client(url, token).jobs.evals(job_id)
    _emit(as_json, listed, score_table({f"{e.label}@{e.step}": e.scores for e in listed}) if listed else "")


@cli.command()
def datasets(as_json: bool = JsonOption, url: str = UrlOption, token: str = TokenOption) -> None:
    """List your uploaded datasets (use one in a spec as dataset:ID)."""
    listed = _client(url, token).datasets.list()
    rows = [f"{d.id}  {d.num_records:>8}  {d.size_bytes:>12}  {d.created_at:%Y-%m-%d %H:%M}  {d.name}" for d in listed]
    _emit(as_json, listed, "\n".join(rows))


@cli.command()
def webhook(
    url: str | None = typer.Argument(
        None, help="Where your jobs report their end (a spec's notify.webhook_url overrides it)."
    ),
    clear: bool = ClearWebhookOption,
    new_secret: bool = NewSecretOption,
    as_json: bool = JsonOption,
    url_: str = UrlOption,
    token: str = TokenOption,
) -> None:
    """Set your default webhook URL; without URL, show it. Prints the signing secret when one is made
    (the first time, or with --new-secret): the receiver checks each message with it."""
    me = _client(url_, token).me
    if url or clear or new_secret:
        shown = me.set_webhook(
            None if clear else url or me.webhook().url, new_secret
        )  # --new-secret alone keeps the URL
    else:
        shown = me.webhook()
    _emit(as_json, shown, _webhook_text(shown.url, shown.secret))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
