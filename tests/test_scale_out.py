"""Scale-out through the product's own entry points: ``visionflow pretrain`` on two processes, and on two "nodes".

The CLI re-runs its command under torchrun (``flows.torchrun_stage``); both gloo workers train the
real pretrain stage with the engine under DDP, rank 0 alone opens the MLflow run and writes the
checkpoints, metrics and plots. Two ways to get two workers: ``train.nprocs=2`` on one machine, and
``train.nnodes=2`` with one process per node, two torchrun launches meeting at a c10d rendezvous on
loopback (``NODE_RANK`` 0 and 1, as two machines run them). The reference of both is the same
command with one process and the batch of both ranks (16 = 2 x 8), run once for the module.

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

# torchrun launches of the real stage (~80 s with their one-process reference): the scale-out suite's
# (`./bootstrap.sh test -m scaleout`, run by CI); the fast suite keeps the engine-level DDP test (tests/test_distributed.py)
pytestmark = pytest.mark.scaleout

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


def pretrain_command(workdir: Path, dataset: Path, db_template: Path, *, nprocs: int, batch_size: int, extra: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str], str]:
    """``visionflow pretrain`` for a subprocess in ``workdir`` with its own MLflow store: (argv, environment, tracking URI)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "mlflow.db").exists():
        shutil.copy(db_template, workdir / "mlflow.db")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    overrides = [
        f"pretrain.dataset={dataset}", "pretrain.out=outputs/pretrain", "pretrain.image_size=32",
        "pretrain.backbone.arch=mobilenet_v2", "pretrain.backbone.weights=IMAGENET1K_V1", "pretrain.backbone.trainable_layers=0",
        "pretrain.train.epochs=3", f"pretrain.train.batch_size={batch_size}", f"pretrain.train.nprocs={nprocs}",
        "pretrain.train.optimizer=sgd", "pretrain.train.lr=0.05", "pretrain.train.device=cpu", "pretrain.train.threads=1",
        "pretrain.train.amp=false", "augment.classification=none", f"tracking.uri={uri}", "tracking.experiment=scale-out", *extra,
    ]
    cmd = [*VISIONFLOW, "pretrain", "--params", str(REPO / "params.yaml"), *(a for o in overrides for a in ("--set", o))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("VISIONFLOW_PARENT_RUN_ID", None)
    return cmd, env, uri


def printed_result(stdout: str) -> dict:
    """The JSON dict the command printed (MLflow may print after it)."""
    return json.JSONDecoder().raw_decode(stdout[stdout.index("{"):])[0]


def pretrain_cli(workdir: Path, dataset: Path, db_template: Path, *, nprocs: int, batch_size: int) -> tuple[dict, str]:
    """``visionflow pretrain`` in a subprocess (own working folder, own MLflow store); returns (printed metrics, tracking URI)."""
    cmd, env, uri = pretrain_command(workdir, dataset, db_template, nprocs=nprocs, batch_size=batch_size)
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return printed_result(done.stdout), uri


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, tiny_classification, mlflow_db_template) -> tuple[dict, Path]:
    """The reference of both scale-out tests: one process, the global batch of 16; (printed metrics, working folder)."""
    workdir = tmp_path_factory.mktemp("single")
    printed, _ = pretrain_cli(workdir, tiny_classification, mlflow_db_template, nprocs=1, batch_size=16)
    return printed, workdir


def assert_one_run_one_set_of_files_same_weights(root: Path, uri: str, printed: dict, single: tuple[dict, Path]) -> None:
    """One MLflow run (rank 0's), one set of files, and the single-process run's weights, losses and metrics."""
    from mlflow import MlflowClient

    from components.engine import load_checkpoint

    # one MLflow run for the whole job, logged by rank 0, with one copy of each epoch's metrics
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("scale-out")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == printed["run_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]

    # one set of files: the checkpoints, the plot and metrics/pretrain.json, nothing from rank 1, no temp files
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                     if p.is_file() and "mlartifacts" not in p.parts and ".visionflow" not in p.parts and p.name != "mlflow.db")
    assert written == ["metrics/pretrain.json", "outputs/pretrain/backbone.pt", "outputs/pretrain/train/best.pt",
                       "outputs/pretrain/train/last.pt", "outputs/pretrain/training_curves.png"]
    last = load_checkpoint(root / "outputs/pretrain/train/last.pt")
    assert isinstance(last["rng"], list) and len(last["rng"]) == 2  # both ranks trained (their RNG states are kept)
    assert json.loads((root / ".visionflow/stages/pretrain.json").read_text())["mlflow_run_id"] == run.info.run_id  # rank 0's run, in the sidecar
    assert json.loads((root / "metrics/pretrain.json").read_text())["run_id"] == run.info.run_id

    # the same weights and metrics as one process with the global batch
    reference_printed, reference_root = single
    reference = load_checkpoint(reference_root / "outputs/pretrain/train/last.pt")
    assert last["global_step"] == reference["global_step"] == 3  # one optimiser step per epoch: 16 images per step
    for name, tensor in reference["state_dict"].items():
        torch.testing.assert_close(last["state_dict"][name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    for key in ("loss", "accuracy", "macro_f1"):
        assert printed[key] == pytest.approx(reference_printed[key], abs=1e-5), key
    assert [h["train_loss"] for h in last["history"]] == pytest.approx([h["train_loss"] for h in reference["history"]], abs=1e-5)
    assert reference["history"][-1]["train_loss"] < 0.7 * reference["history"][0]["train_loss"]  # the head did learn


def test_cli_pretrain_on_two_processes_matches_one_process_with_the_same_global_batch(tmp_path, tiny_classification, mlflow_db_template, single_process):
    ddp, ddp_uri = pretrain_cli(tmp_path / "ddp", tiny_classification, mlflow_db_template, nprocs=2, batch_size=8)
    assert_one_run_one_set_of_files_same_weights(tmp_path / "ddp", ddp_uri, ddp, single_process)


def test_two_nodes_on_loopback_match_one_process_with_the_same_global_batch(tmp_path, tiny_classification, mlflow_db_template, single_process):
    """Two torchrun launches of one process each, as two machines would run them: same command, same c10d endpoint, NODE_RANK 0 and 1.

    The working folder is shared by both "nodes" (what shared storage gives real machines): global rank 0,
    whichever node the rendezvous put it on, writes the files and opens the one MLflow run.
    """
    from components.distributed import find_free_port

    root = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{find_free_port()}"
    cmd, env, uri = pretrain_command(root, tiny_classification, mlflow_db_template, nprocs=1, batch_size=8,
                                     extra=("pretrain.train.nnodes=2", f"pretrain.train.rdzv_endpoint={endpoint}"))
    nodes = [subprocess.Popen(cmd, cwd=root, env={**env, "NODE_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (1, 0)]  # node 1 first: it waits at the endpoint until node 0 hosts the rendezvous
    try:
        outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (out, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-3000:] + err[-3000:]
    printed = [printed_result(out) for out, _ in outputs if "{" in out]
    assert len(printed) == 1  # rank 0's launcher alone prints the stage's result
    assert_one_run_one_set_of_files_same_weights(root, uri, printed[0], single_process)
