"""`distill train`: a spec run here, without the service."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import typer

from app.cli.core import ExitCode, Failure, JsonOption, SetOption, cli, emit, score_table


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
    emit(as_json, {"output": output, "scores": scores, "best_step": best}, f"{score_table(scores)}\n{where}")
