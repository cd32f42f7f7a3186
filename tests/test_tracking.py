"""Tracking: URI resolution, lineage tags, nested runs, dataset inputs with the DVC digest, a real `mlflow server`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import free_port, stop_process_group

from components.config import TrackingConfig
from components.errors import TrackingError
from components.tracking import RunContext, provenance_tags, resolve_tracking_uri, section_hash, start_run

REPO = Path(__file__).resolve().parents[1]


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(TrackingConfig(uri="sqlite:///x.db")) == "sqlite:///x.db"
    assert resolve_tracking_uri(TrackingConfig()) == "http://127.0.0.1:1"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_provenance_tags_and_section_hash(monkeypatch):
    from components.config import load_params

    tags = provenance_tags(params_hash="p", data_hash="d.dir", root=REPO, flow_run_id="flow-123")
    assert len(tags["visionflow.git_commit"]) == 40 and tags["mlflow.source.git.commit"] == tags["visionflow.git_commit"]
    assert tags["visionflow.prefect_flow_run_id"] == "flow-123" and tags["visionflow.data_hash"] == "d.dir"
    a = load_params(REPO / "params.yaml")
    b = load_params(REPO / "params.yaml", ["detect.yolo.lambda_coord=3.0"])
    assert section_hash(a.detect.yolo) != section_hash(b.detect.yolo) and section_hash(a.detect.ssd) == section_hash(b.detect.ssd)


def test_unreachable_server_is_a_tracking_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(TrackingError, match="127.0.0.1:9"):
        with start_run(TrackingConfig(uri="http://127.0.0.1:9"), run_name="x"):
            pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, mlflow_db_template):
    """A real `mlflow server` on loopback with a sqlite backend and served artifacts."""
    import shutil
    import time
    import urllib.request

    work = tmp_path_factory.mktemp("server")
    shutil.copy(mlflow_db_template, work / "mlflow.db")
    port = free_port()
    proc = subprocess.Popen(
        [str(REPO / ".venv/bin/mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination",
         str(work / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no background job workers: starts faster
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "mlflow server exited"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield url
    finally:
        stop_process_group(proc)


def test_runs_against_real_server(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from components.config import load_params
    from components.data.versioning import dvc_directory_md5

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(uri=mlflow_server, experiment="server-test")
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images/a.txt").write_text("pixels")
    (tmp_path / "plot.png").write_bytes(b"\x89PNG")
    section = load_params(REPO / "params.yaml").detect.yolo
    with start_run(cfg, run_name="retrain", tags={"visionflow.pipeline": "retrain"}) as parent:
        context = RunContext(flow_run_id="flow-abc", parent_run_id=parent.run_id)  # what the CLI passes a stage process
        with start_run(cfg, run_name="detect-yolo", context=context) as child:
            tags = child.log_provenance(section=section, dataset=data, dataset_name="shapes")
            child.log_params({"detect": {"yolo": {"S": 7, "lambda_coord": 5.0}}})
            for epoch in range(3):
                child.log_metrics({"loss": 1.0 / (epoch + 1), "val": {"map_50": 0.1 * epoch}, "bad": float("nan")}, step=epoch)
            child.log_artifact(tmp_path / "plot.png", artifact_path="plots")
            child.log_dict({"a": 1}, "metrics/x.json")
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.tags["visionflow.prefect_flow_run_id"] == "flow-abc"
    assert run.data.tags["visionflow.params_hash"] == section_hash(section) == tags["visionflow.params_hash"]
    assert run.data.tags["visionflow.data_hash"] == dvc_directory_md5(data)
    assert run.data.params["detect.yolo.lambda_coord"] == "5.0"  # flat keys
    assert [m.value for m in client.get_metric_history(child.run_id, "loss")] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert "bad" not in run.data.metrics and "val.map_50" in run.data.metrics
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == dvc_directory_md5(data)[:36] and dataset_input.dataset.name == "shapes"
    assert {f.path for f in client.list_artifacts(child.run_id, "plots")} == {"plots/plot.png"}


def test_failed_stage_run_ends_failed(tracking_cfg):
    from mlflow import MlflowClient

    from components.errors import TrainingError

    with pytest.raises(TrainingError):
        with start_run(tracking_cfg, run_name="diverges") as run:
            raise TrainingError("loss is nan")
    assert MlflowClient(tracking_uri=tracking_cfg.uri).get_run(run.run_id).info.status == "FAILED"


def test_same_dataset_logged_by_two_processes_at_once_links_both_runs(tracking_cfg, tmp_path):
    """The race the concurrent pretrain test hit in CI, made deterministic.

    MLflow's SQL store looks the dataset up, then inserts it. Here another writer (a second
    sqlite connection, standing in for the second stage process) inserts the same
    (experiment, name, digest) between that look-up and the insert of the first run: the
    first insert fails on the unique constraint, and log_dataset must still link the run.
    """
    import sqlite3
    import uuid

    from mlflow import MlflowClient
    from mlflow.store.tracking.dbmodels.models import SqlDataset
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.txt").write_text("a")
    db = tracking_cfg.uri.removeprefix("sqlite:///")
    raced = []

    def other_process_wins(session, flush_context, instances):
        new = [obj for obj in session.new if isinstance(obj, SqlDataset)]
        if new and not raced:
            raced.append(new[0].digest)
            with sqlite3.connect(db) as other:
                other.execute(
                    "INSERT INTO datasets (dataset_uuid, experiment_id, name, digest, dataset_source_type, dataset_source) VALUES (?, ?, ?, ?, ?, ?)",
                    (uuid.uuid4().hex, new[0].experiment_id, new[0].name, new[0].digest, new[0].dataset_source_type, new[0].dataset_source),
                )

    event.listen(Session, "before_flush", other_process_wins)
    try:
        with start_run(tracking_cfg, run_name="first") as run:
            digest = run.log_dataset(name="shapes", source=data)
    finally:
        event.remove(Session, "before_flush", other_process_wins)
    assert raced == [digest[:36]]  # the race happened
    client = MlflowClient(tracking_uri=tracking_cfg.uri)
    (linked,) = client.get_run(run.run_id).inputs.dataset_inputs
    assert linked.dataset.name == "shapes" and linked.dataset.digest == digest[:36]


def test_other_tracking_errors_are_not_retried(monkeypatch):
    from mlflow.exceptions import MlflowException

    from components import tracking

    calls = []

    class Client:
        def log_inputs(self, run_id, datasets):
            calls.append(run_id)
            raise MlflowException("RESOURCE_DOES_NOT_EXIST: run r1 not found")

    with pytest.raises(MlflowException, match="not found"):
        tracking._log_inputs_racing(Client(), "r1", [])
    assert calls == ["r1"]
