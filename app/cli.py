"""`distill`: the command line for people and CI."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import typer

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="Distil large language models into small ones (MiniLLM).")


@cli.callback()
def _group() -> None:
    """Keep `distill train` a subcommand while it is the only one."""


@cli.command()
def train(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job spec, YAML or JSON."),
    output: Path = typer.Option(..., "--output", "-o", help="Run directory: events.jsonl, checkpoints/, resume/."),
) -> None:
    """Run a job spec here, without the service. Resumes from OUTPUT's latest checkpoint if it has one."""
    from worker.engine.run import launch_command, run
    from worker.engine.spec import SpecError, load_spec
    from worker.engine.trainer import Cancelled

    try:
        job = load_spec(spec)
    except SpecError as err:
        typer.echo(f"error: {spec}: {err}", err=True)
        raise typer.Exit(2) from None
    output.mkdir(parents=True, exist_ok=True)
    if job.resources.devices > 1 and "LOCAL_RANK" not in os.environ:
        raise typer.Exit(subprocess.call(launch_command(job, spec, output)))
    try:
        scores = run(spec, output)
    except Cancelled as stop:
        typer.echo(f"cancelled at step {stop.args[0]}; checkpoints in {output / 'checkpoints'}")
        raise typer.Exit(130) from None
    except Exception as err:  # reported in events.jsonl with the traceback's summary
        typer.echo(f"error: {type(err).__name__}: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(_score_table(scores))
    typer.echo(f"checkpoints: {output / 'checkpoints'}")


def _score_table(scores: dict[str, dict[str, float]]) -> str:
    metrics = sorted({k for s in scores.values() for k in s})
    rows = [["model", *metrics]] + [[label, *(f"{s[m]:.3f}" if m in s else "-" for m in metrics)] for label, s in scores.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
