"""The client commands: `submit`, `validate`, `resume`, `jobs`, `status`, `logs`, `cancel`, `delete`,
`download`, `checkpoints`, `evals`, `datasets`, `delete-dataset`, `webhook`, talking to the API through
distill_client.api."""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, TextIO

import typer

from ..models import DATA_FILES
from ..status import JobStatus
from .core import (
    OUTCOMES,
    ClearWebhookOption,
    ExitCode,
    Failure,
    JsonOption,
    NewSecretOption,
    SetOption,
    TokenOption,
    UrlOption,
    api_client,
    cli,
    emit,
    json_text,
    score_table,
    webhook_text,
)

if TYPE_CHECKING:
    from ..api import Client
    from ..models import JobOut


WaitOption = typer.Option(False, "--wait", help="Wait for the job to end; the exit code says how it ended.")
FollowOption = typer.Option(False, "--follow", help="Like --wait, printing events as they come.")
MetaOption = typer.Option([], "--meta", metavar="KEY=VALUE", help="A metadata pair (repeatable).")
TimeoutOption = typer.Option(
    None, "--timeout", min=0, help="With --wait or --follow: give up after this many seconds (exit code 7)."
)


def _pairs(options: list[str]) -> dict[str, str]:
    """--meta KEY=VALUE options as a dict."""
    if bad := [o for o in options if "=" not in o]:
        raise Failure(f"--meta {bad[0]!r}: give KEY=VALUE", ExitCode.USAGE)
    return dict(o.split("=", 1) for o in options)


def _upload_local_data(client: Client, spec: dict, base: Path) -> dict:
    """Local data files in the spec are uploaded, so the server never needs this machine's paths. A
    file uploaded before (same name, same bytes) is used again: a repeated submit then sends the same
    spec, which its Idempotency-Key needs, and stores nothing twice."""
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


def submit_file(
    client: Client,
    spec_path: Path,
    overrides: list[str],
    idempotency_key: Optional[str],
    metadata: Optional[dict[str, str]] = None,
) -> JobOut:
    from ..api import load_spec_file

    request = load_spec_file(spec_path, overrides)
    if metadata:  # as strings, whatever they look like (a commit SHA of digits stays text)
        request["metadata"] = {**request.get("metadata", {}), **metadata}
    return client.jobs.create(_upload_local_data(client, request, spec_path.parent), idempotency_key)


def follow_job(
    client: Client, job: JobOut, verbose: bool, out: TextIO, how: str = "submitted", timeout: Optional[float] = None
) -> JobOut:
    """A job just submitted (or resumed: `how`), once it has ended (or `timeout` seconds have passed),
    shown on the way: where it is queued, a progress bar (on stderr), with `verbose` its events, then its
    scores, best checkpoint and outcome as lines on `out`."""
    from tqdm import tqdm

    typer.echo(f"{how} {job.id} ({job.name}, {job.status})", file=out)
    _say_where_queued(job)
    bar = None
    for event in client.jobs.events(job.id, follow=True, timeout=timeout):
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
    if job.status not in OUTCOMES:
        typer.echo(f"{job.id}: still {job.status} after {timeout:g} s (--timeout); it runs on", file=out)
        return job
    typer.echo(f"{job.id}: {job.status}" + (f" ({job.error.code}: {job.error.message})" if job.error else ""), file=out)
    return job


@cli.command()
def submit(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job spec, YAML or JSON."),
    overrides: list[str] = SetOption,
    meta: list[str] = MetaOption,
    wait: bool = WaitOption,
    follow: bool = FollowOption,
    timeout: float = TimeoutOption,
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
    client = api_client(url, token)
    job = submit_file(client, spec, overrides, idempotency_key, _pairs(meta))
    if not (wait or follow):
        emit(as_json, job, job.id)
        _say_where_queued(job)
        return
    _until_it_ends(client, job, follow, as_json, "submitted", timeout)


def _until_it_ends(
    client: Client, job: JobOut, follow: bool, as_json: bool, how: str, timeout: Optional[float]
) -> None:
    """--wait and --follow: show the job until it ends, then exit with its outcome's code (TIMED_OUT
    if `timeout` seconds pass first)."""
    out = sys.stderr if as_json else sys.stdout  # stdout: the JSON alone
    job = follow_job(client, job, verbose=follow, out=out, how=how, timeout=timeout)
    if as_json:
        typer.echo(json_text(job))
    raise typer.Exit(OUTCOMES.get(job.status, ExitCode.TIMED_OUT))


@cli.command()
def resume(
    job_id: str,
    wait: bool = WaitOption,
    follow: bool = FollowOption,
    timeout: float = TimeoutOption,
    as_json: bool = JsonOption,
    url: str = UrlOption,
    token: str = TokenOption,
) -> None:
    """Continue a failed or cancelled job from its newest checkpoint, as a new attempt; print its status."""
    client = api_client(url, token)
    job = client.jobs.resume(job_id)
    if not (wait or follow):
        emit(as_json, job, job.status)
        _say_where_queued(job)
        return
    _until_it_ends(client, job, follow, as_json, "resumed", timeout)


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
    from ..api import load_spec_file

    client = api_client(url, token)
    checked = client.jobs.validate(_upload_local_data(client, load_spec_file(spec, overrides), spec.parent))
    emit(as_json, checked, f"{spec}: valid")


@cli.command()
def jobs(
    status: str = typer.Option(None, help="Only jobs in this status."),
    limit: int = typer.Option(20, min=1, help="How many, newest first."),
    after: str = typer.Option(None, "--after", help="Start after this job (the last of the previous page)."),
    meta: list[str] = MetaOption,
    as_json: bool = JsonOption,
    url: str = UrlOption,
    token: str = TokenOption,
) -> None:
    """List jobs, newest first (--meta: those with each KEY=VALUE); says how to get the next page."""
    found = api_client(url, token).jobs.list(
        status=status, page_size=min(limit + 1, 100), metadata=_pairs(meta), after=after
    )
    listed = list(itertools.islice(found, limit + 1))
    more, listed = len(listed) > limit, listed[:limit]
    rows = [f"{j.id:<20}  {j.status:<10} {j.progress.step:>6}/{j.progress.total_steps:<6} {j.name}" for j in listed]
    emit(as_json, listed, "\n".join([f"{'id':<20}  {'status':<10} {'step':>6}/{'total':<6} name", *rows]))
    if more:
        typer.echo(f"more: distill jobs --after {listed[-1].id}", err=True)


@cli.command()
def status(job_id: str, as_json: bool = JsonOption, url: str = UrlOption, token: str = TokenOption) -> None:
    """Print a job as JSON (with or without --json; while it is queued, its place in the queue on stderr)."""
    job = api_client(url, token).jobs.retrieve(job_id)
    typer.echo(json_text(job))
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
    attempt: Optional[int] = typer.Option(None, min=1, help="With --raw: this attempt's output (default: the latest)."),
    tail: Optional[int] = typer.Option(None, min=1, help="With --raw: only its last N lines."),
    as_json: bool = JsonOption,
    url: str = UrlOption,
    token: str = TokenOption,
) -> None:
    """Print a job's events (with --json, all of them as one list, once read); with --raw, the
    training process's own output (the API answers at most its last 4 MiB)."""
    if raw:
        if follow:
            raise Failure("--raw prints the log as it is now; --follow follows the events", ExitCode.USAGE)
        text = api_client(url, token).jobs.log(job_id, attempt, tail)
        if as_json:
            typer.echo(json_text({"log": text}))
        else:
            typer.echo(text, nl=False)
        return
    events = api_client(url, token).jobs.events(job_id, follow)
    if as_json:
        typer.echo(json_text(list(events)))
        return
    for event in events:
        if event.message:
            typer.echo(f"{event.created_at:%Y-%m-%d %H:%M:%S}  {event.level:<7} {event.type:<10} {event.message}")


@cli.command()
def cancel(job_id: str, as_json: bool = JsonOption, url: str = UrlOption, token: str = TokenOption) -> None:
    """Cancel a job: at once if queued, at its next step if running. Print its status (an ended job's, as it is)."""
    job = api_client(url, token).jobs.cancel(job_id)
    emit(as_json, job, job.status)


@cli.command()
def delete(job_id: str, as_json: bool = JsonOption, url: str = UrlOption, token: str = TokenOption) -> None:
    """Delete a job that has ended, with its checkpoints, evaluations, events and files."""
    emit(as_json, api_client(url, token).jobs.delete(job_id), f"deleted {job_id}")


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

        model_dir = api_client(url, token).checkpoints.download(job_id, step, output, progress)
    emit(as_json, {"path": model_dir}, str(model_dir))


@cli.command()
def checkpoints(job_id: str, as_json: bool = JsonOption, url: str = UrlOption, token: str = TokenOption) -> None:
    """List a job's checkpoints: step, archive size, SHA-256, and which are latest and best."""
    listed = api_client(url, token).checkpoints.list(job_id)
    marks = [" ".join(m for m in ("latest", "best") if getattr(c, m)) for c in listed]
    rows = [f"{c.step:>8}  {c.archive_size:>12}  {c.archive_sha256}  {m}" for c, m in zip(listed, marks)]
    emit(as_json, listed, "\n".join([f"{'step':>8}  {'bytes':>12}  {'sha256':<64}  marks", *rows]).rstrip())


@cli.command()
def evals(job_id: str, as_json: bool = JsonOption, url: str = UrlOption, token: str = TokenOption) -> None:
    """Print a job's evaluation scores: the selection set at each step, then the test set's table."""
    listed = api_client(url, token).jobs.evals(job_id)
    emit(as_json, listed, score_table({f"{e.label}@{e.step}": e.scores for e in listed}) if listed else "")


@cli.command()
def datasets(as_json: bool = JsonOption, url: str = UrlOption, token: str = TokenOption) -> None:
    """List your uploaded datasets (use one in a spec as dataset:ID)."""
    listed = api_client(url, token).datasets.list()
    rows = [
        f"{d.id:<19}  {d.num_records:>8}  {d.size_bytes:>12}  {d.created_at:%Y-%m-%d %H:%M}  {d.name}" for d in listed
    ]
    header = f"{'id':<19}  {'records':>8}  {'bytes':>12}  {'uploaded':<16}  name"
    emit(as_json, listed, "\n".join([header, *rows]))


@cli.command("delete-dataset")
def delete_dataset(dataset_id: str, as_json: bool = JsonOption, url: str = UrlOption, token: str = TokenOption) -> None:
    """Delete an uploaded dataset, freeing its bytes of your quota (refused while a running job reads it)."""
    emit(as_json, api_client(url, token).datasets.delete(dataset_id), f"deleted {dataset_id}")


@cli.command()
def webhook(
    url: Optional[str] = typer.Argument(
        None, help="Where your jobs report their end (a job's notify.webhook_url overrides it)."
    ),
    clear: bool = ClearWebhookOption,
    new_secret: bool = NewSecretOption,
    as_json: bool = JsonOption,
    url_: str = UrlOption,
    token: str = TokenOption,
) -> None:
    """Set your default webhook URL; without URL, show it. Prints the signing secret when one is made
    (the first time, or with --new-secret): the receiver checks each message with it."""
    me = api_client(url_, token).me
    if url or clear or new_secret:
        shown = me.set_webhook(
            None if clear else url or me.webhook().url, new_secret
        )  # --new-secret alone keeps the URL
    else:
        shown = me.webhook()
    emit(as_json, shown, webhook_text(shown.url, shown.secret))
