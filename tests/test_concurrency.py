"""Two pipeline runs started at the same time with different params (issue 8, reliability 2).

Both are ``visionflow run`` processes in the same project with ``orchestration.run_scoped: true``:
each works in its own ``runs/<run>/`` folder (``flows.retrain.run_scoped_workspace``), so neither
overwrites the other's dataset, checkpoints or metrics, and each register stage registers the
models of its own run. The pipeline is the real retrain flow (ingest, augment preview, pretrain,
finetune, register) on tiny shapes data, with one or two optimiser steps per stage. Run b also
trains its pretrain stage on two processes (``pretrain.train.nprocs=2``): its Prefect task launches
the stage under torchrun, and rank 0's result comes back to the flow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_PIPELINE = [
    "data.shapes.num_train=8", "data.shapes.num_val=4", "data.shapes.num_test=4", "data.shapes.image_size=64",
    "data.shapes.min_size=12", "data.shapes.max_size=30", "orchestration.datasets={}", "orchestration.run_scoped=true",
    "orchestration.retries=0", "orchestration.task_runner=sequential",
    "detect.architectures=[]", "segment.architectures=[]",
    "pretrain.dataset=data/shapes", "pretrain.image_size=32", "pretrain.backbone.arch=vfnet_small",
    "pretrain.train.epochs=1", "pretrain.train.max_steps_per_epoch=2", "pretrain.train.batch_size=8", "pretrain.train.device=cpu",
    "finetune.dataset=data/shapes", "finetune.strategies=[scratch]", "finetune.image_size=32", "finetune.imagenet_backbone.arch=vfnet_small",
    "finetune.imagenet_backbone.weights=null", "finetune.train.epochs=1", "finetune.train.max_steps_per_epoch=2",
    "finetune.train.batch_size=8", "finetune.train.device=cpu",
]


def test_two_concurrent_runs_keep_their_own_outputs_and_model_versions(prefect_harness, tmp_path, mlflow_db_template):
    from mlflow import MlflowClient
    from prefect.settings import get_current_settings

    from components.config import load_params
    from components.tracking import section_hash

    shutil.copy(mlflow_db_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [*TINY_PIPELINE, f"tracking.uri={uri}", "tracking.experiment=concurrent"]
    variants = {"a": [*common, "pretrain.train.lr=0.003", "pretrain.train.seed=1"], "b": [*common, "pretrain.train.lr=0.01", "pretrain.train.seed=2", "pretrain.train.nprocs=2"]}
    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "--params", str(REPO / "params.yaml"), *(a for o in sets for a in ("--set", o))],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name, sets in variants.items()
    }  # both started before either is waited for: they overlap
    reports = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
        reports[name], _ = json.JSONDecoder().raw_decode(out[out.rindex('{\n  "mlflow_run_id"'):])

    folders = {name: Path(r["run_dir"]) for name, r in reports.items()}
    assert folders["a"] != folders["b"] and all(f.parent == tmp_path / "runs" for f in folders.values())
    assert (tmp_path / "runs" / "latest").resolve() in {f.resolve() for f in folders.values()}
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "metrics").exists()  # nothing written outside the run folders

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for name, folder in folders.items():
        params = load_params(REPO / "params.yaml", variants[name])
        metrics = json.loads((folder / "metrics/pretrain.json").read_text())
        assert (folder / "outputs/pretrain/backbone.pt").is_file() and (folder / "data/shapes/dataset.json").is_file()
        training_run = client.get_run(metrics["run_id"])
        assert float(training_run.data.params["pretrain.train.lr"]) == params.pretrain.train.lr  # this folder holds this run's training
        entry = reports[name]["register"]["registered"]["visionflow-backbone"]
        version = client.get_model_version("visionflow-backbone", entry["version"])
        # the version registered by this run is this run's model: its training run, params hash and metric
        assert version.tags["visionflow.training_run_id"] == metrics["run_id"]
        assert version.tags["visionflow.params_hash"] == section_hash(params.pretrain)
        assert float(version.tags["metric.accuracy"]) == metrics["accuracy"]
        assert "visionflow-classifier" in reports[name]["register"]["registered"]
    # run b's pretrain task launched its stage under torchrun (2 gloo ranks), from inside the Prefect task
    from components.engine import load_checkpoint

    ranks = {name: load_checkpoint(folder / "outputs/pretrain/train/last.pt")["rng"] for name, folder in folders.items()}
    assert isinstance(ranks["b"], list) and len(ranks["b"]) == 2 and not isinstance(ranks["a"], list)
    versions = {reports[n]["register"]["registered"]["visionflow-backbone"]["version"] for n in folders}
    assert versions == {"1", "2"}  # two distinct versions, one per run
