"""Scale-out through the product's own entry points: ``visionflow pretrain`` with ``train.nprocs=2`` under torchrun.

The CLI re-runs its command under torchrun (``flows.torchrun_stage``); both gloo workers train the
real pretrain stage with the engine under DDP, rank 0 alone opens the MLflow run and writes the
checkpoints, metrics and plots. The reference is the same command with one process and the
batch of both ranks (16 = 2 x 8).

Why the two runs can agree to float rounding: every optimiser step sees the whole train split
(16 images: one global batch), so the data order does not matter, and the gradient DDP averages
(the mean of two 8-image means) equals the 16-image mean. The backbone is frozen
(``trainable_layers=0``: its BatchNorm layers stay in eval mode), because on a CPU there is no
SyncBatchNorm and per-rank batch statistics would differ from the single process by design (the
ImageNet mobilenet_v2 from the offline torch hub cache, so that the new head learns red vs blue
in 3 steps); the augmentation is ``none`` (deterministic) and the optimiser plain SGD (AdamW's
normalisation would amplify rounding in tiny gradients). The logged train loss is the mean over
both ranks (the engine all-reduces the epoch sums). Tolerance: weights ``atol=1e-5, rtol=1e-4``,
losses and metrics 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VISIONFLOW = [sys.executable, "-m", "flows.cli"]


def write_imagefolder(root: Path, *, per_class: dict[str, int]) -> Path:
    """``root/<split>/<red|blue>/<i>.png``: 32x32 images of a noisy colour per class (seeded)."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for name, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_classification(tmp_path_factory) -> Path:
    from components.config import DataConfig
    from components.data.ingest import ingest

    work = tmp_path_factory.mktemp("scale-out")
    source = write_imagefolder(work / "source", per_class={"train": 8, "val": 4})
    out = work / "dataset"
    ingest(f"imagefolder:{source}", out, cfg=DataConfig())
    return out


def pretrain_cli(workdir: Path, dataset: Path, db_template: Path, *, nprocs: int, batch_size: int) -> tuple[dict, str]:
    """``visionflow pretrain`` in a subprocess (own working folder, own MLflow store); returns (printed metrics, tracking URI)."""
    workdir.mkdir(parents=True)
    shutil.copy(db_template, workdir / "mlflow.db")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    overrides = [
        f"pretrain.dataset={dataset}", "pretrain.out=outputs/pretrain", "pretrain.image_size=32",
        "pretrain.backbone.arch=mobilenet_v2", "pretrain.backbone.weights=IMAGENET1K_V1", "pretrain.backbone.trainable_layers=0",
        "pretrain.train.epochs=3", f"pretrain.train.batch_size={batch_size}", f"pretrain.train.nprocs={nprocs}",
        "pretrain.train.optimizer=sgd", "pretrain.train.lr=0.05", "pretrain.train.device=cpu", "pretrain.train.threads=1",
        "pretrain.train.amp=false", "augment.classification=none", f"tracking.uri={uri}", "tracking.experiment=scale-out",
    ]
    cmd = [*VISIONFLOW, "pretrain", "--params", str(REPO / "params.yaml"), *(a for o in overrides for a in ("--set", o))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("VISIONFLOW_PARENT_RUN_ID", None)
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed, _ = json.JSONDecoder().raw_decode(done.stdout[done.stdout.index("{"):])  # MLflow may print after it
    return printed, uri


def test_cli_pretrain_on_two_processes_matches_one_process_with_the_same_global_batch(tmp_path, tiny_classification, mlflow_db_template):
    from mlflow import MlflowClient

    from components.engine import load_checkpoint

    ddp, ddp_uri = pretrain_cli(tmp_path / "ddp", tiny_classification, mlflow_db_template, nprocs=2, batch_size=8)
    single, single_uri = pretrain_cli(tmp_path / "single", tiny_classification, mlflow_db_template, nprocs=1, batch_size=16)

    # one MLflow run for the two-process job, logged by rank 0, with one copy of each epoch's metrics
    client = MlflowClient(tracking_uri=ddp_uri)
    experiment = client.get_experiment_by_name("scale-out")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == ddp["run_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]

    # one set of files: the checkpoints, the plot and metrics/pretrain.json, nothing from rank 1, no temp files
    root = tmp_path / "ddp"
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                     if p.is_file() and "mlartifacts" not in p.parts and ".visionflow" not in p.parts and p.name != "mlflow.db")
    assert written == ["metrics/pretrain.json", "outputs/pretrain/backbone.pt", "outputs/pretrain/train/best.pt",
                       "outputs/pretrain/train/last.pt", "outputs/pretrain/training_curves.png"]
    last = load_checkpoint(root / "outputs/pretrain/train/last.pt")
    assert isinstance(last["rng"], list) and len(last["rng"]) == 2  # both ranks trained (their RNG states are kept)
    assert json.loads((root / ".visionflow/stages/pretrain.json").read_text())["mlflow_run_id"] == run.info.run_id  # rank 0's run, in the sidecar
    assert json.loads((root / "metrics/pretrain.json").read_text())["run_id"] == run.info.run_id

    # the same weights and metrics as one process with the global batch
    reference = load_checkpoint(tmp_path / "single/outputs/pretrain/train/last.pt")
    assert last["global_step"] == reference["global_step"] == 3  # one optimiser step per epoch: 16 images per step
    for name, tensor in reference["state_dict"].items():
        torch.testing.assert_close(last["state_dict"][name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    for key in ("loss", "accuracy", "macro_f1"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-5), key
    assert [h["train_loss"] for h in last["history"]] == pytest.approx([h["train_loss"] for h in reference["history"]], abs=1e-5)
    assert reference["history"][-1]["train_loss"] < 0.7 * reference["history"][0]["train_loss"]  # the head did learn
