"""Prefect around the stage table: the scheduled deployment, the work pool, the flow's artifacts."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from components.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


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
    a Kubernetes/Docker worker in production), runs the retrain flow of a project's stage table."""
    import os
    import sys

    import yaml
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import get_current_settings

    from flows.retrain import deploy_to_work_pool

    project = tmp_path / "project"
    project.mkdir()
    for name in ("components", "flows"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["shapes"].update(num_train=8, num_val=4, num_test=4, image_size=64, min_size=12, max_size=30)
    params["tracking"].update(uri=tracking_cfg.uri, experiment=tracking_cfg.experiment)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: visionflow ingest\n    deps: [components/data]\n    params: [data]\n    outs:\n      - ${data.out}\n")
    env = {**os.environ, "PATH": f"{REPO / '.venv/bin'}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([str(REPO / ".venv/bin/dvc"), "init", "--no-scm", "-q"], cwd=project, check=True, env=env)

    pool = "visionflow-test-process-pool"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    deploy_to_work_pool(pool, "params.yaml", [], name="vf-pool-test", source=project, job_variables={"working_dir": str(project)})
    flow_run = run_deployment(name="visionflow-retrain/vf-pool-test", timeout=0)  # scheduled, not run by us
    assert flow_run.state.is_scheduled()

    env["PREFECT_API_URL"] = str(get_current_settings().api.url)
    worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--run-once"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
    with get_client(sync_client=True) as client:
        done = client.read_flow_run(flow_run.id)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    assert done.state.is_completed(), done.state.message
    assert done.work_pool_name == pool
    assert json.loads((project / "data/shapes/dataset.json").read_text())["splits"] == {"train": 8, "val": 4, "test": 4}
    assert "ingest" in yaml.safe_load((project / "dvc.lock").read_text())["stages"]  # recorded in dvc.lock
    assert "visionflow-retrain-summary" in {a.key for a in artifacts}  # this run's summary
    # the ingest's MLflow run points back at the flow run the worker executed
    client = MlflowClient(tracking_uri=tracking_cfg.uri)
    runs = client.search_runs([client.get_experiment_by_name(tracking_cfg.experiment).experiment_id])
    assert str(flow_run.id) in {r.data.tags.get("visionflow.prefect_flow_run_id") for r in runs}
