"""Experiment trackers against the real things: a job's run in an MLflow server the test starts, and
TensorBoard event files read back with TensorBoard's own reader."""

import subprocess
from pathlib import Path

import httpx
import pytest
from helpers import read_events, tiny_spec, wait_for

from worker.engine.events import Fanout, JsonlReporter
from worker.engine.launch import free_port
from worker.engine.paths import PROJECT_ROOT
from worker.engine.spec import parse_spec
from worker.engine.trackers import trackers_for
from worker.engine.trainer import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder, port = tmp_path_factory.mktemp("mlflow"), free_port()
    mlflow = subprocess.check_output([PROJECT_ROOT / "scripts/ensure-mlflow-server.sh"], text=True).strip()
    # One worker process: the default four each import MLflow, which is most of a start on 2 cores.
    command = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "art")]
    with (folder / "server.log").open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert server.poll() is None, (folder / "server.log").read_text()[-2000:]
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, timeout=120, what=f"the MLflow server ({folder / 'server.log'})")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def tracked_run(tmp_path, dataset, **sections) -> Path:
    spec = parse_spec(tiny_spec(dataset, method="kd", **sections))
    out = tmp_path / "run"
    train(spec, out, Fanout(JsonlReporter(out / "events.jsonl"), *trackers_for(spec, out)))
    return out


def test_a_job_is_recorded_in_mlflow_and_in_tensorboard_event_files(tmp_path, dataset, mlflow_server, monkeypatch):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    tracking = {"trackers": ["mlflow", "tensorboard"], "experiment": "tracked"}
    out = tracked_run(
        tmp_path,
        dataset,
        training={"steps": 4},
        eval={"every_steps": 2},
        checkpoints={"every_steps": 2},
        tracking=tracking,
    )

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "kd" and run.data.params["training.steps"] == "4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "selection/rouge_l")] == [0, 2, 4]
    assert {"test/teacher/rouge_l", "test/final/rouge_l", "test/best/reverse_kl"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "best_checkpoint")}
    assert {"best_checkpoint/config.json", "best_checkpoint/model.safetensors"} <= artifacts, artifacts

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert {"train/lr", "selection/rouge_l", "test/final/rouge_l"} <= set(events.Tags()["scalars"])


def test_a_tracking_server_that_is_down_costs_the_records_not_the_job(tmp_path, dataset, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    out = tracked_run(
        tmp_path, dataset, training={"steps": 2}, eval={"every_steps": 0}, tracking={"trackers": ["mlflow"]}
    )
    assert read_events(out)[-1]["data"]["state"] == "succeeded"
    assert "MLflow tracking stopped for this attempt" in caplog.text


def test_the_operators_trackers_apply_to_a_job_that_names_none_and_unknown_ones_are_refused(tmp_path, monkeypatch):
    spec = parse_spec({"student": {"model": "builtin:tiny-student"}})
    monkeypatch.setenv("DISTILL_TRACKERS", "tensorboard")
    assert [type(t).__name__ for t in trackers_for(spec, tmp_path)] == ["TensorBoardReporter"]
    monkeypatch.setenv("DISTILL_TRACKERS", "tensorboard,wandb")
    with pytest.raises(ValueError, match=r"DISTILL_TRACKERS: unknown trackers \['wandb'\]"):
        trackers_for(spec, tmp_path)
