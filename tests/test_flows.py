"""Prefect flows: transient-only retries, DVC-keyed caching, the retrain chain, skip-unchanged, the deployment."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from components.errors import ConfigError, DataError, TrackingError, TrainingError

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.shapes.num_train=8", "data.shapes.num_val=4", "data.shapes.num_test=4", "data.shapes.image_size=64",
    "data.shapes.min_size=12", "data.shapes.max_size=30", "orchestration.retry_delay_seconds=0",
]


@pytest.fixture()
def project(tmp_path, monkeypatch, tracking_cfg):
    """A DVC project in tmp_path: this repo's dvc.yaml/params.yaml and a copy of components/ (hashed deps)."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copytree(REPO / "components", root / "components", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(REPO / ".venv/bin/dvc"), "init", "-q"], cwd=root, check=True)
    monkeypatch.chdir(root)
    overrides = [*TINY, f"tracking.uri={tracking_cfg.uri}", f"tracking.experiment={tracking_cfg.experiment}", "orchestration.datasets={}"]
    return root, overrides


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize(("exc", "transient"), [(TrackingError("down"), True), (ConnectionError(), True), (TimeoutError(), True), (OSError("io"), True),
                                                (FileNotFoundError(), False), (ConfigError("x"), False), (DataError("x"), False),
                                                (TrainingError("nan"), False), (ValueError(), False)])
def test_is_transient(exc, transient):
    from flows.stage_tasks import is_transient

    assert is_transient(exc) is transient


def test_retries_only_transient_errors(prefect_harness, project):
    from prefect import flow

    from components.config import load_params
    from flows.stage_tasks import stage_task

    root, overrides = project
    params = load_params(root / "params.yaml", [*overrides, "orchestration.cache=false", "orchestration.retries=2"])
    calls = {"transient": 0, "data": 0}

    def flaky(params):
        calls["transient"] += 1
        if calls["transient"] < 3:
            raise TrackingError("tracking server unreachable")
        return {"ok": True}

    def bad_data(params):
        calls["data"] += 1
        raise DataError("unusable", file="x.json")

    @flow
    def both():
        return stage_task(flaky, "ingest", params)(params), stage_task(bad_data, "ingest", params)(params, return_state=True)

    ok, state = both()
    assert ok["ok"] is True and calls["transient"] == 3  # two retries cured a transient failure
    assert state.is_failed() and calls["data"] == 1  # a deterministic error is not retried


# --------------------------------------------------------------------------- DVC-keyed cache


def test_ingest_cache_follows_dvc_hashes(prefect_harness, project):
    from components.config import load_params
    from flows.stage_tasks import stage_fingerprint
    from flows.stages import ingest_flow

    root, overrides = project
    first = ingest_flow(params_path="params.yaml", overrides=overrides, return_state=True)
    assert first.is_completed()
    again = ingest_flow(params_path="params.yaml", overrides=overrides, return_state=True)
    task_state = _task_states(again.state_details.flow_run_id)["ingest"]
    assert task_state == "Cached"  # same deps and params: the persisted result is reused across flow runs
    changed = [*overrides, "data.shapes.num_test=5"]
    state = ingest_flow(params_path="params.yaml", overrides=changed, return_state=True)
    assert _task_states(state.state_details.flow_run_id)["ingest"] == "Completed"  # a params change recomputes
    fp = stage_fingerprint("ingest", load_params("params.yaml", changed))
    assert fp["params"]["data"]["shapes"]["num_test"] == 5 and fp["deps"]["components/data"].endswith(".dir")
    shutil.rmtree(root / "data/shapes")  # outputs gone: recomputed even though the key hits
    state = ingest_flow(params_path="params.yaml", overrides=changed, return_state=True)
    assert _task_states(state.state_details.flow_run_id)["ingest"] == "Completed" and (root / "data/shapes/dataset.json").exists()


def _task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs}


# --------------------------------------------------------------------------- the retrain chain


def _fake_training(monkeypatch, root: Path, calls: list[str], *, fail: str | None = None):
    """Replace the training stage bodies by quick ones that write real (tiny, untrained) checkpoints and metrics."""
    from conftest import write_tiny_checkpoint

    import flows.stages as stages

    def pretrain(params):
        calls.append("pretrain")
        return {"ok": True}

    def finetune(params):
        calls.append("finetune")
        write_tiny_checkpoint(root / "outputs/finetune/fine_tuning/best.pt", task="classification", model_name="classifier",
                              model_args={"num_classes": 2}, categories=["a", "b"], image_size=32)
        (root / "metrics").mkdir(exist_ok=True)
        (root / "metrics/finetune.json").write_text(json.dumps({"fine_tuning": {"test": {"accuracy": 0.75}}}))
        return {"ok": True}

    def detect(params, *, arch):
        calls.append(f"detect@{arch}")
        if arch == fail:
            raise TrainingError("loss is nan at epoch 1; training diverged")
        return {"arch": arch}

    def segment(params, *, arch):
        calls.append(f"segment@{arch}")
        return {"arch": arch}

    def compare(params):
        calls.append("compare")
        return {"architectures": {"x": {"map_50": 0.1}}}

    monkeypatch.setitem(stages.STAGE_BODIES, "augment", lambda params: calls.append("augment") or {})
    monkeypatch.setitem(stages.STAGE_BODIES, "pretrain", pretrain)
    monkeypatch.setitem(stages.STAGE_BODIES, "finetune", finetune)
    monkeypatch.setitem(stages.STAGE_BODIES, "detect", detect)
    monkeypatch.setitem(stages.STAGE_BODIES, "segment", segment)
    monkeypatch.setitem(stages.STAGE_BODIES, "detect_compare", compare)
    monkeypatch.setitem(stages.STAGE_BODIES, "segment_compare", compare)


def test_retrain_chain_skip_unchanged_and_failures(prefect_harness, project, monkeypatch, tracking_cfg):
    """Orchestration only (training bodies replaced): order, concurrency, registry, skip, force, failure isolation."""
    from mlflow import MlflowClient

    from flows.retrain import run_pipeline

    root, overrides = project
    overrides = [*overrides, "orchestration.cache=false", "detect.architectures=[yolo, ssd]", "segment.architectures=[fcn]",
                 "finetune.strategies=[fine_tuning]"]
    calls: list[str] = []
    _fake_training(monkeypatch, root, calls)
    report = run_pipeline("params.yaml", overrides)
    assert report["outcome"] == "trained"
    assert calls.index("pretrain") < min(calls.index("finetune"), calls.index("detect@yolo"), calls.index("segment@fcn"))
    assert report["register"]["registered"]["visionflow-classifier"]["promoted"] is True
    assert report["timing"]["wall_s"] >= report["timing"]["stages_s"] >= 0
    client = MlflowClient(tracking_uri=tracking_cfg.uri)
    parent = client.get_run(report["mlflow_run_id"])
    assert parent.data.tags["visionflow.prefect_flow_run_id"] == report["flow_run_id"]
    assert parent.data.tags["visionflow.data_hash"] == report["data_hash"] and parent.inputs.dataset_inputs
    mv = client.get_model_version_by_alias("visionflow-classifier", "champion")
    assert mv.tags["visionflow.prefect_flow_run_id"] == report["flow_run_id"]  # registry -> Prefect flow run
    register_run = client.get_run(mv.tags["visionflow.register_run_id"])
    assert register_run.data.tags["mlflow.parentRunId"] == report["mlflow_run_id"]  # registry -> pipeline run

    calls.clear()
    skipped = run_pipeline("params.yaml", overrides)
    assert skipped["outcome"] == "skipped" and "unchanged" in skipped["reason"] and "pretrain" not in calls

    calls.clear()
    _fake_training(monkeypatch, root, calls, fail="ssd")
    with pytest.raises(TrainingError, match="detect@ssd"):
        run_pipeline("params.yaml", overrides, force=True)  # unchanged, but forced: trains again
    assert "pretrain" in calls and "detect@yolo" in calls and "segment@fcn" in calls  # the other branches still ran
    runs = client.search_runs([parent.info.experiment_id], "tags.`visionflow.outcome` = 'partial'")
    assert runs and runs[0].info.status == "FAILED"


def test_artifacts_published(prefect_harness):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert "visionflow-retrain-summary" in keys  # written by the retrain test above (same harness)


# --------------------------------------------------------------------------- the scheduled deployment


def test_deployment_registers_with_cron_schedule(prefect_harness):
    from prefect.client.orchestration import get_client

    from flows.retrain import build_deployment

    deployment = build_deployment(REPO / "params.yaml", ["detect.architectures=[yolo]"], cron="0 3 * * 1", name="vf-test")
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
    assert stored.name == "vf-test" and stored.parameters["overrides"] == ["detect.architectures=[yolo]"]
    assert [s.schedule.cron for s in stored.schedules] == ["0 3 * * 1"]
    with pytest.raises(ConfigError, match="cron"):
        build_deployment(REPO / "params.yaml", [], cron="every monday", name="bad")


def test_prefect_yaml_declares_the_same_deployment():
    import yaml

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = [d for d in spec["deployments"] if d["name"] == "visionflow-retrain"]
    assert dep["entrypoint"] == "flows/retrain.py:retrain_flow"
    assert dep["schedules"][0]["cron"] and dep["work_pool"]["name"]


# --------------------------------------------------------------------------- a work pool with a process worker


def test_deployment_runs_on_a_process_work_pool(prefect_harness, tmp_path, tracking_cfg):
    """The production path: a deployment on a work pool, picked up by a worker (a process worker here,
    a Kubernetes/Docker worker in production), runs the flow from this repository's source."""
    import os
    import sys

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.settings import get_current_settings

    from flows.retrain import deploy_to_work_pool

    pool = "visionflow-test-process-pool"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    out = tmp_path / "data" / "shapes"
    overrides = [*TINY, f"data.out={out}", "orchestration.cache=false", "orchestration.datasets={}",
                 f"tracking.uri={tracking_cfg.uri}", f"tracking.experiment={tracking_cfg.experiment}"]
    deploy_to_work_pool(pool, REPO / "params.yaml", overrides, name="vf-pool-test", entrypoint="flows/stages.py:ingest_flow")
    flow_run = run_deployment(name="visionflow-ingest/vf-pool-test", timeout=0)  # scheduled, not run by us
    assert flow_run.state.is_scheduled()

    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}
    worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--run-once"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
    with get_client(sync_client=True) as client:
        done = client.read_flow_run(flow_run.id)
    assert done.state.is_completed(), done.state.message
    assert done.work_pool_name == pool
    assert json.loads((out / "dataset.json").read_text())["splits"] == {"train": 8, "val": 4, "test": 4}
    # the ingest's MLflow run points back at the flow run the worker executed
    runs = MlflowClient(tracking_uri=tracking_cfg.uri).search_runs(
        [MlflowClient(tracking_uri=tracking_cfg.uri).get_experiment_by_name(tracking_cfg.experiment).experiment_id])
    assert str(flow_run.id) in {r.data.tags.get("visionflow.prefect_flow_run_id") for r in runs}
