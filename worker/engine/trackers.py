"""Experiment trackers: a job's parameters, step metrics, evaluations and best checkpoint, sent to
MLflow or Weights & Biases, or written as TensorBoard event files, as the job reports them. Each is a
reporter, like events.jsonl (events.py), so the trainer knows nothing of them.

Which ones a job uses: its spec's `tracking.trackers`, else the operator's DISTILL_TRACKERS (a comma
list). Where their records go is the operator's too, in the trackers' own variables: MLFLOW_TRACKING_URI;
WANDB_API_KEY, WANDB_BASE_URL, WANDB_ENTITY and WANDB_MODE (offline keeps the run in the job's folder).

A tracker never fails a job: a tracking server that is down, or a W&B client that is not installed
(`pip install 'distill[wandb]'`), costs its records (with a warning), not the training. A resumed job
goes on in the same MLflow or W&B run and the same TensorBoard folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from distill_client.status import TERMINAL, JobStatus

from .events import Event, Reporter
from .spec import JobSpec

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # under the job's output folder
MLFLOW_RUN_FILE = "mlflow-run-id"  # under the job's output folder: the run a resumed job goes on in
WANDB_RUN_FILE = "wandb-run-id"  # likewise for W&B (its own files go to the job's folder too, under wandb/)


def trackers_for(spec: JobSpec, output_dir: Path) -> list[Reporter]:
    """The job's trackers, as reporters for the process that reports (rank 0)."""
    names = spec.tracking.trackers or [n.strip() for n in os.environ.get("DISTILL_TRACKERS", "").split(",") if n]
    made = {
        "mlflow": lambda: MlflowReporter(spec, output_dir),
        "tensorboard": lambda: TensorBoardReporter(output_dir),
        "wandb": lambda: WandbReporter(spec, output_dir),
    }
    unknown = set(names) - set(made)
    if unknown:
        raise ValueError(f"DISTILL_TRACKERS: unknown trackers {sorted(unknown)}; known: {sorted(made)}")
    return [made[name]() for name in dict.fromkeys(names)]


def eval_metrics(data: dict) -> dict[str, float]:
    """An eval event's scores under the names trackers show: `selection/rouge_l`, `test/final/rouge_l`."""
    prefix = "selection" if data["set"] == "selection" else f"test/{data['label']}"
    return {f"{prefix}/{name}": float(value) for name, value in data["scores"].items()}


def flat_params(value: dict, prefix: str = "") -> dict[str, str]:
    """A spec as flat `section.field` parameters (MLflow's form)."""
    flat = {}
    for key, item in value.items():
        if isinstance(item, dict):
            flat.update(flat_params(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(item)
    return flat


class TensorBoardReporter:
    """Scalars in OUTPUT/tensorboard: `train/<metric>` per step, and each evaluation's scores."""

    def __init__(self, output_dir: Path):
        self.log_dir, self.writer = output_dir / TENSORBOARD_DIR, None

    def emit(self, event: Event) -> None:
        if event.type not in ("metrics", "eval", "state"):
            return
        if self.writer is None:  # made by the first event: only the reporting process writes
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), flush_secs=10)
        if event.type == "metrics":
            for name, value in event.data["values"].items():
                self.writer.add_scalar(f"train/{name}", value, event.data["step"], walltime=event.time)
        elif event.type == "eval":
            for name, value in eval_metrics(event.data).items():
                self.writer.add_scalar(name, value, event.data["step"], walltime=event.time)
        if event.type == "eval" or event.data.get("state") in TERMINAL:
            self.writer.flush()

    def should_cancel(self) -> bool:
        return False


class MlflowReporter:
    """One MLflow run per job, in the experiment named like the job's (`tracking.experiment` to choose):
    the spec as parameters, metrics per step, evaluations, the best checkpoint as artifacts under
    `best_checkpoint/`, and the job's end as the run's status."""

    STATUS = {JobStatus.SUCCEEDED: "FINISHED", JobStatus.FAILED: "FAILED", JobStatus.CANCELLED: "KILLED"}

    def __init__(self, spec: JobSpec, output_dir: Path):
        self.spec, self.output_dir = spec, output_dir
        self.client, self.run_id, self.broken = None, None, False

    def emit(self, event: Event) -> None:
        if self.broken or event.type not in ("metrics", "eval", "state"):
            return
        try:
            self._record(event)
        except Exception as err:  # the server's and the client's many errors: the job goes on without it
            self.broken = True
            log.warning("MLflow tracking stopped for this attempt: %s: %s", type(err).__name__, err)

    def _record(self, event: Event) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            self._start()
        millis = int(event.time * 1000)
        if event.type == "metrics":
            values, step = event.data["values"], event.data["step"]
            metrics = [Metric(name, float(value), millis, step) for name, value in values.items()]
        elif event.type == "eval":
            metrics = [Metric(n, v, millis, event.data["step"]) for n, v in eval_metrics(event.data).items()]
        else:
            metrics = []
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        state = event.data.get("state")
        if state == JobStatus.SUCCEEDED and (best := best_checkpoint(self.output_dir)) is not None:
            self.client.log_artifacts(self.run_id, str(best), "best_checkpoint")
        if state in self.STATUS:
            self.client.set_terminated(self.run_id, self.STATUS[state])

    def _start(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        self.client = MlflowClient()
        saved = self.output_dir / MLFLOW_RUN_FILE
        if saved.exists():  # a resumed job: its run goes on
            self.run_id = saved.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = self.spec.tracking.experiment or self.spec.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=self.output_dir.name)
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in flat_params(self.spec.model_dump(mode="json")).items()]
        for start in range(0, len(params), 100):  # the most one request may carry
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("distill.method", self.spec.method)])
        saved.write_text(self.run_id)

    def should_cancel(self) -> bool:
        return False


def best_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint the trainer chose as best, else the newest (none chosen: no selection set scored)."""
    from .checkpoints import best_step

    step, saved = best_step(output_dir), sorted((output_dir / "checkpoints").glob("step-*"))
    folder = output_dir / "checkpoints" / f"step-{step:06d}" if step is not None else next(reversed(saved), None)
    return folder if folder is not None and folder.is_dir() else None


class WandbReporter:
    """One W&B run per job, in the project named like the job's (`tracking.experiment` to choose): the spec
    as its config, `train/<metric>` per step, evaluations, the best checkpoint as a `model` artifact, and
    the job's end as the run's exit code (0 when it succeeded)."""

    def __init__(self, spec: JobSpec, output_dir: Path):
        self.spec, self.output_dir = spec, output_dir
        self.run, self.broken = None, False

    def emit(self, event: Event) -> None:
        if self.broken or event.type not in ("metrics", "eval", "state"):
            return
        try:
            self._record(event)
        except Exception as err:  # not installed, a server that is down, …: the job goes on without it
            self.broken = True
            log.warning("W&B tracking stopped for this attempt: %s: %s", type(err).__name__, err)

    def _record(self, event: Event) -> None:
        if self.run is None:
            self._start()
        # W&B's own step only grows, and the best checkpoint's scores come last at an earlier step: every
        # metric is charted against `job_step` instead (W&B's define_metric, for data out of order).
        if event.type == "metrics":
            values = {f"train/{name}": value for name, value in event.data["values"].items()}
            self.run.log({**values, "job_step": event.data["step"]})
        elif event.type == "eval":
            self.run.log({**eval_metrics(event.data), "job_step": event.data["step"]})
        state = event.data.get("state")
        if state == JobStatus.SUCCEEDED and (best := best_checkpoint(self.output_dir)) is not None:
            import wandb

            artifact = wandb.Artifact(f"{self.output_dir.name}-best", type="model")
            artifact.add_dir(str(best))
            self.run.log_artifact(artifact)
        if state in TERMINAL:
            self.run.finish(exit_code=0 if state == JobStatus.SUCCEEDED else 1)

    def _start(self) -> None:
        import wandb

        saved = self.output_dir / WANDB_RUN_FILE
        self.run = wandb.init(
            project=self.spec.tracking.experiment or self.spec.name,
            name=self.output_dir.name,
            id=saved.read_text().strip() if saved.exists() else None,  # a resumed job: its run goes on
            resume="allow",
            dir=str(self.output_dir),
            config=self.spec.model_dump(mode="json"),
            tags=[self.spec.method],
            # The job's log is its own output; no sampling process beside the training; no code or git state.
            settings=wandb.Settings(
                console="off", silent=True, x_disable_stats=True, disable_git=True, save_code=False
            ),
        )
        self.run.define_metric("job_step")
        self.run.define_metric("*", step_metric="job_step")
        saved.write_text(self.run.id)

    def should_cancel(self) -> bool:
        return False
