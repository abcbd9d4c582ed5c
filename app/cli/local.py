"""`distill train`: a spec run here, without the service."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import typer

from distill_client.cli.core import ExitCode, Failure, JsonOption, SetOption, cli, emit, score_table


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
    from pydantic import ValidationError

    from app import acceptance
    from app.schemas import JobRequest
    from distill_client.api import load_spec_file
    from worker.engine.launch import launch_command
    from worker.engine.spec import format_validation_error

    data = load_spec_file(spec, overrides)
    try:
        job, notify = JobRequest.model_validate(data).split()  # a request file as `distill submit` takes it
    except ValidationError as err:
        raise Failure(f"{spec}: {format_validation_error(err)}", ExitCode.USAGE) from None
    if notify.webhook_url:
        print(f"{spec}: notify.webhook_url is the service's; a run without it tells no one", file=sys.stderr)
    try:  # the checks the service runs, on the user's own machine: every path they can read is theirs
        job = acceptance.runnable(job, acceptance.Reader(roots=None, reads_files=True))
    except acceptance.Refused as err:
        raise Failure(f"{spec}: {err}", ExitCode.USAGE) from None
    output.mkdir(parents=True, exist_ok=True)
    ran = output / "spec.json"  # what runs (overrides applied, defaults filled in), kept with the run
    ran.write_text(json.dumps(job.model_dump(mode="json"), indent=2))
    # With --json, stdout is the summary alone: the run's messages go to stderr (and events.jsonl).
    if job.resources.devices > 1 and "LOCAL_RANK" not in os.environ:
        launch = launch_command(job.resources.devices, ran, output)
        raise typer.Exit(subprocess.call(launch, stdout=sys.stderr if as_json else None))
    # Only now the engine (seconds of imports): the launcher's processes import it themselves.
    from worker.engine.checkpoints import best_step, step_dir_name
    from worker.engine.run import run
    from worker.engine.trainer import Cancelled

    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            scores = run(ran, output)
    except Cancelled as stop:
        raise Failure(f"cancelled {stop.what}; checkpoints in {output / 'checkpoints'}", ExitCode.CANCELLED) from None
    except Exception as err:  # reported in events.jsonl too
        raise Failure(f"{type(err).__name__}: {err}", ExitCode.FAILED) from None
    best = best_step(output)
    where = f"checkpoints: {output / 'checkpoints'}" + (f" (best: {step_dir_name(best)})" if best is not None else "")
    emit(as_json, {"output": output, "scores": scores, "best_step": best}, f"{score_table(scores)}\n{where}")
