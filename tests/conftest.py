"""Shared fixtures: no network, a tiny-thread torch, one Prefect test harness per session."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture()
def one_torch_thread():
    """One intra-op thread for tiny tensors: on 2 shared cores, torch's pool makes them many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (about 20 s to start), shared by flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory):
    """An empty sqlite MLflow store with its schema migrated once (migrations take ~10 s on a busy CPU)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def tracking_cfg(tmp_path, monkeypatch, mlflow_db_template):
    """A TrackingConfig pointing at a fresh sqlite MLflow store under tmp_path."""
    import shutil

    from components.config import TrackingConfig

    shutil.copy(mlflow_db_template, tmp_path / "mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("VISIONFLOW_PARENT_RUN_ID", raising=False)
    return TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="test", artifact_location=(tmp_path / "mlartifacts").as_uri())


def write_tiny_checkpoint(path, *, task: str, model_name: str, model_args: dict, categories: list[str], **extra):
    """A checkpoint in the engine's format (``{task, model_name, model_args, state_dict, categories}``), random weights."""
    import torch

    from components.engine import save_checkpoint
    from components.models import get_model

    torch.manual_seed(0)
    model = get_model(task, model_name, **model_args)
    return save_checkpoint(path, {"task": task, "model_name": model_name, "model_args": model_args, "state_dict": model.state_dict(), "categories": categories, **extra})


@pytest.fixture(scope="session")
def registry_store(tmp_path_factory, mlflow_db_template):
    """A sqlite MLflow store with ``champion`` versions of a tiny classifier, detector and segmenter.

    Built once per session through the real ``register`` stage (``run_register``) from checkpoints in
    the engine's format; yields ``(TrackingConfig, uri, workdir)``.
    """
    import json
    import shutil

    from components.config import load_params

    work = tmp_path_factory.mktemp("registry")
    shutil.copy(mlflow_db_template, work / "mlflow.db")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    old_cwd, old_uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(work)
    try:
        cats = ["circle", "square"]
        from PIL import Image

        for folder in ("data/shapes/images/test", "data/hymenoptera/classification/val/ants", "data/cifar10/classification/test/a"):
            (work / folder).mkdir(parents=True)
            Image.new("RGB", (64, 48), (90, 140, 200)).save(work / folder / "0.png")
        write_tiny_checkpoint(work / "outputs/finetune/fine_tuning/best.pt", task="classification", model_name="classifier",
                              model_args={"num_classes": 2, "backbone": "convnet_small", "weights": None}, categories=["ants", "bees"], image_size=32,
                              eval_crop=0.875)  # as the finetune stage writes it: served shorter side, then the centre crop
        write_tiny_checkpoint(work / "outputs/detect/yolo/best.pt", task="detection", model_name="yolo",
                              model_args={"num_classes": 2, "image_size": 64, "S": 4, "hidden": 32}, categories=cats, image_size=64)
        write_tiny_checkpoint(work / "outputs/segment/fcn/best.pt", task="segmentation", model_name="fcn",
                              model_args={"num_classes": 2}, categories=cats, image_size=64)
        write_tiny_checkpoint(work / "outputs/pretrain/backbone.pt", task="classification", model_name="classifier",
                              model_args={"num_classes": 3, "backbone": "convnet_small"}, categories=["a", "b", "c"], image_size=32)
        (work / "metrics/detect").mkdir(parents=True)
        (work / "metrics/segment").mkdir()
        (work / "metrics/pretrain.json").write_text(json.dumps({"accuracy": 0.4, "checkpoint": "outputs/pretrain/backbone.pt"}))
        (work / "metrics/finetune.json").write_text(json.dumps({"fine_tuning": {"test": {"accuracy": 0.8}}}))
        (work / "metrics/detect/yolo.json").write_text(json.dumps({"test": {"bbox": {"map_50": 0.5, "map": 0.3}}}))
        (work / "metrics/segment/fcn.json").write_text(json.dumps({"test": {"miou": 0.6}}))
        params = load_params(
            Path(__file__).resolve().parents[1] / "params.yaml",
            [f"tracking.uri={uri}", "tracking.experiment=registry", "detect.architectures=[yolo]", "segment.architectures=[fcn]",
             "finetune.strategies=[fine_tuning]"],
        )
        from components.stages.register import run_register

        report = run_register(params)
    finally:
        os.chdir(old_cwd)
        if old_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
    return params.tracking, uri, work, report


def free_port() -> int:
    """A loopback TCP port nobody listens on (for servers started by tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc) -> None:
    """Terminate a server started with ``start_new_session=True`` and its workers; kill after 20 s."""
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # already gone
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def object_images() -> list[np.ndarray]:
    """Three RGB images of different sizes and aspect ratios: noise plus a bright square and a disc.

    Objects, so that random-weight detectors give separated scores (on noise alone near-tied scores
    make NMS keep either of two boxes, and two correct implementations disagree).
    """
    rng = np.random.default_rng(0)
    out = []
    for h, w in ((48, 80), (64, 64), (100, 70)):
        img = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
        img[h // 4 : h // 2, w // 5 : w // 2] = (230, 40, 40)
        yy, xx = np.mgrid[:h, :w]
        img[(yy - 3 * h // 4) ** 2 + (xx - 2 * w // 3) ** 2 < (min(h, w) // 6) ** 2] = (40, 60, 230)
        out.append(img)
    return out
