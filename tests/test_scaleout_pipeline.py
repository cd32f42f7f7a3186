"""The pipeline on shared stores and on a Dask cluster: an MLflow tracking server, a DVC remote, a fresh clone, two worker processes.

One small project (``tests/pipeline_project.py``: every stage a few steps, one detector, one segmenter)
is set up once for the module, as a team would:

1. its tracking URI is a real ``mlflow server`` (sqlite backend, served artifacts) on loopback, and its
   DVC remote a folder outside the workspace (``dvc remote add -d``);
2. ``visionflow run`` with the default thread runner trains and registers every model; ``dvc.lock``,
   the metrics and the code are committed to git, the outputs pushed to the remote (``dvc push``);
3. a fresh ``git clone`` restores the outputs with ``dvc pull``: ``dvc status`` is clean, the files are there;
4. in the clone, ``visionflow run --force --set orchestration.task_runner=dask`` runs every stage again,
   as tasks of a local Dask cluster of two worker *processes* (each task starts the stage's process).

Checked: the clone's ``dvc.lock`` records the same out hashes as the thread runner's (every checkpoint
is a function of code, data and params, whichever runner or machine ran it; the plots of measured speed
excepted, and the metrics files compared by their quality numbers, as in ``tests/test_pipeline.py``),
and its register stage added no version: every model is "unchanged" at the version the first run
registered on the shared server.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from pipeline_project import lock_outs, make_project, run_tool
from test_pipeline import _metrics
from test_tracking import mlflow_server  # noqa: F401 - the module's real loopback `mlflow server` (a fixture)

# two whole pipeline runs (about 4 minutes on 2 idle cores): the scale-out suite, `./bootstrap.sh test -m scaleout`, which CI runs
pytestmark = pytest.mark.scaleout

TIMED_OUTPUTS = ("comparison.png", "lineage")  # plots of measured speed: not a function of the inputs


def _shrink(root: Path) -> None:
    """One detector, one segmenter, one fine-tuning strategy: every kind of stage, as few of each as possible."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["detect"]["architectures"] = ["yolo"]
    params["finetune"]["strategies"] = ["scratch"]
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _git(root: Path, *argv: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *argv], cwd=root, check=True, capture_output=True)


def _run(root: Path, overrides: list[str], *, force: bool = False) -> dict:
    from flows.retrain import run_pipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("VISIONFLOW_PARENT_RUN_ID", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        return run_pipeline("params.yaml", overrides, force=force)


@pytest.fixture(scope="module")
def shared_stores(tmp_path_factory, prefect_harness, mlflow_server) -> SimpleNamespace:  # noqa: F811 - the imported fixture
    """origin, clone, remote, the thread runner's and the Dask runner's reports, ``dvc status`` of the clone after ``dvc pull``."""
    base = tmp_path_factory.mktemp("shared-stores")
    origin = make_project(base / "origin", base / "sources", mlflow_server)
    _shrink(origin)
    remote = base / "dvc-remote"
    run_tool(origin, "dvc", "remote", "add", "-d", "storage", str(remote))
    threads = _run(origin, [])

    _git(origin, "add", "-A")
    _git(origin, "commit", "-q", "-m", "pipeline run: dvc.lock, metrics, params, code")
    run_tool(origin, "dvc", "push", "-q")
    clone = base / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True, capture_output=True)
    run_tool(clone, "dvc", "pull", "-q")
    status = run_tool(clone, "dvc", "status").stdout

    dask = _run(clone, ["orchestration.task_runner=dask", "orchestration.max_workers=2"], force=True)
    return SimpleNamespace(origin=origin, clone=clone, remote=remote, threads=threads, dask=dask, status=status)


def test_a_fresh_clone_restores_every_output_from_the_dvc_remote(shared_stores):
    origin, clone = shared_stores.origin, shared_stores.clone
    assert shared_stores.threads["outcome"] == "trained", shared_stores.threads["stages"]
    assert "up to date" in shared_stores.status, shared_stores.status
    outs = lock_outs(origin)
    assert {"outputs/pretrain", "outputs/detect/yolo", "outputs/segment/fcn", "data/shapes"} <= set(outs)
    assert sum(1 for p in shared_stores.remote.rglob("*") if p.is_file()) >= len(outs)  # pushed: at least one object per output
    for path in outs:
        assert (clone / path).exists(), path
    assert (clone / "outputs/detect/yolo/best.pt").read_bytes() == (origin / "outputs/detect/yolo/best.pt").read_bytes()


def test_dask_workers_give_the_thread_runners_models_and_register_nothing_twice(shared_stores, mlflow_server):  # noqa: F811
    origin, clone, threads, dask = shared_stores.origin, shared_stores.clone, shared_stores.threads, shared_stores.dask
    states = {name: entry["state"] for name, entry in dask["stages"].items()}
    assert set(states) == set(threads["stages"]) and set(states.values()) <= {"ran", "skipped"}, states
    assert yaml.safe_load((clone / "params.yaml").read_text())["orchestration"]["task_runner"] == "dask"

    outs_threads, outs_dask = lock_outs(origin), lock_outs(clone)
    assert outs_dask.keys() == outs_threads.keys()
    differ = {p: (outs_threads[p], outs_dask[p]) for p in outs_threads
              if outs_threads[p] != outs_dask[p] and not p.endswith(TIMED_OUTPUTS) and not p.startswith("metrics/")}  # metrics: below
    assert not differ, differ
    assert _metrics(clone) == _metrics(origin)  # every quality number (timings and run ids aside)

    first = json.loads((origin / "metrics/register.json").read_text())
    second = json.loads((clone / "metrics/register.json").read_text())
    registered = {name: entry["version"] for name, entry in first["registered"].items()}
    assert registered and not second.get("registered"), second
    assert {name: entry["version"] for name, entry in second["unchanged"].items()} == registered

    # both runs logged to the one tracking server: two pipeline parent runs, each with its stages' runs
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("e2e")
    for report in (threads, dask):
        children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{report['mlflow_run_id']}'")
        assert {"pretrain", "detect-yolo", "segment-fcn"} <= {r.info.run_name for r in children}
    versions = {name: len(client.search_model_versions(f"name = '{name}'")) for name in registered}
    assert set(versions.values()) == {1}, versions  # one version per model on the shared registry
