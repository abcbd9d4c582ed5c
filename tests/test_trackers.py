"""Experiment trackers against the real things: a job's run in an MLflow server the test starts,
TensorBoard event files read back with TensorBoard's own reader, and a W&B run kept offline, read back
from W&B's own record file with W&B's own record definitions."""

import json
import struct
import subprocess
import sys
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


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (run-ID.wandb): a 7-byte header (":W&B", magic, version), then
    LevelDB-style log blocks of 32 KiB holding chunks [crc32, length, kind] of serialised `Record`s
    (kind 1: a whole record; 2, 3, 4: its first, middle and last part; a block's last < 7 bytes are padding)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, position, found, pending = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B", data[:7]
    while position + 7 <= len(data):
        if (left := 32768 - position % 32768) < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            found.append(Record.FromString(pending))
            pending = b""
    return found


def tracked_run(tmp_path, dataset, **sections) -> Path:
    spec = parse_spec(tiny_spec(dataset, method="kd", **sections))
    out = tmp_path / "run"
    train(spec, out, Fanout(JsonlReporter(out / "events.jsonl"), *trackers_for(spec, out)))
    return out


def test_a_job_is_recorded_in_mlflow_wandb_and_tensorboard_event_files(tmp_path, dataset, mlflow_server, monkeypatch):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the run stays in the job's folder: no W&B server here
    tracking = {"trackers": ["mlflow", "tensorboard", "wandb"], "experiment": "tracked"}
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

    run_id = (out / "wandb-run-id").read_text()
    (run_file,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = {}
    for record in wandb_records(run_file):
        records.setdefault(record.WhichOneof("record_type"), []).append(record)
    (run,) = records["run"]
    assert (run.run.project, run.run.display_name, list(run.run.tags)) == ("tracked", "run", ["kd"])
    config = {item.key: json.loads(item.value_json) for item in run.run.config.update}
    assert config["method"] == "kd" and config["training"]["steps"] == 4
    history = {}  # job step -> what was logged at it (W&B's own step counts the calls)
    for record in records["history"]:
        items = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        history.setdefault(items["job_step"], {}).update(items)
    assert [step for step, logged in sorted(history.items()) if "train/loss" in logged] == [1, 2, 3, 4]
    assert [step for step, logged in sorted(history.items()) if "selection/rouge_l" in logged] == [0, 2, 4]
    assert {"test/teacher/rouge_l", "test/initial/rouge_l"} <= set(history[0]) and "test/final/rouge_l" in history[4]
    # The best checkpoint's scores, logged last, at its own (earlier) step.
    best = [e["data"]["step"] for e in read_events(out) if e["type"] == "eval" and e["data"]["label"] == "best"]
    assert best and "test/best/reverse_kl" in history[best[0]]
    (artifact,) = records["artifact"]
    assert (artifact.artifact.name, artifact.artifact.type) == ("run-best", "model")
    assert {"config.json", "model.safetensors"} <= {entry.path for entry in artifact.artifact.manifest.contents}
    assert [record.exit.exit_code for record in records["exit"]] == [0]


def test_a_tracking_server_that_is_down_or_a_client_not_installed_costs_the_records_not_the_job(
    tmp_path, dataset, monkeypatch, caplog
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as on a worker without it
    out = tracked_run(
        tmp_path, dataset, training={"steps": 2}, eval={"every_steps": 0}, tracking={"trackers": ["mlflow", "wandb"]}
    )
    assert read_events(out)[-1]["data"]["state"] == "succeeded"
    assert "MLflow tracking stopped for this attempt" in caplog.text
    assert "W&B tracking stopped for this attempt: ModuleNotFoundError" in caplog.text


def test_the_operators_trackers_apply_to_a_job_that_names_none_and_unknown_ones_are_refused(tmp_path, monkeypatch):
    spec = parse_spec({"student": {"model": "builtin:tiny-student"}})
    monkeypatch.setenv("DISTILL_TRACKERS", "tensorboard")
    assert [type(t).__name__ for t in trackers_for(spec, tmp_path)] == ["TensorBoardReporter"]
    monkeypatch.setenv("DISTILL_TRACKERS", "tensorboard,neptune")
    with pytest.raises(ValueError, match=r"DISTILL_TRACKERS: unknown trackers \['neptune'\]"):
        trackers_for(spec, tmp_path)
