"""Datasets over the canonical layout return tv_tensors; the logged digest is DVC's own directory hash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from components.config import DataConfig, ShapesConfig
from components.data.datasets import (
    ClassificationDataset,
    DetectionDataset,
    SegmentationDataset,
    detection_collate,
    load_manifest,
)
from components.data.ingest import ingest
from components.data.versioning import dvc_directory_md5
from components.errors import DataError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shapes"
    cfg = DataConfig(
        shapes=ShapesConfig(
            image_size=64, num_train=6, num_val=2, num_test=2, min_size=12, max_size=30, crop_size=16
        )
    )
    ingest("shapes", out, cfg=cfg)
    return out


def test_detection_dataset_and_collate(shapes):
    ds = DetectionDataset(shapes, "train", masks=True)
    assert len(ds) == 6 and ds.classes == load_manifest(shapes)["categories"]
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 64, 64) and image.dtype == torch.float32
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    assert boxes.canvas_size == (64, 64) and boxes.dtype == torch.float32
    n = len(boxes)
    assert (
        target["labels"].dtype == torch.int64
        and target["labels"].shape == (n,)
        and target["labels"].min() >= 1
    )
    assert isinstance(target["masks"], tv_tensors.Mask) and target["masks"].shape == (n, 64, 64)
    assert (
        target["masks"].dtype == torch.uint8
        and target["area"].shape == (n,)
        and target["iscrowd"].shape == (n,)
    )
    assert torch.equal(target["area"], target["masks"].flatten(1).sum(1).float())
    images, targets = next(iter(DataLoader(ds, batch_size=4, collate_fn=detection_collate)))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 4
    assert [t["image_id"] for t in targets] == [1, 2, 3, 4]
    assert "masks" not in DetectionDataset(shapes, "val")[0][1]


def test_segmentation_and_classification_datasets(shapes):
    seg = SegmentationDataset(shapes, "val")
    image, mask = seg[1]
    assert isinstance(mask, tv_tensors.Mask) and mask.shape == (64, 64) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= set(range(len(seg.classes) + 1)) | {255}
    cls = ClassificationDataset(shapes, "train")
    image, label = cls[0]
    assert image.shape == (3, 16, 16) and 0 <= label < len(cls.classes) and cls.classes == seg.classes


def test_missing_view_or_split_is_a_clear_error(shapes, tmp_path):
    with pytest.raises(DataError, match="no dataset.json"):
        DetectionDataset(tmp_path, "train")
    with pytest.raises(DataError, match="no split 'dev'"):
        SegmentationDataset(shapes, "dev")


def test_digest_equals_dvc_add(shapes, tmp_path):
    """The digest logged to MLflow is the md5 ``dvc add`` records for the same folder."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(shapes, repo / "data")
    dvc = Path(sys.executable).parent / "dvc"
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=repo, check=True, env=env)
    subprocess.run([str(dvc), "add", "-q", "data"], cwd=repo, check=True, env=env)
    recorded = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert recorded == dvc_directory_md5(repo / "data") == dvc_directory_md5(shapes)


def test_ingest_logs_dataset_to_mlflow(tmp_path, tracking_cfg):
    import mlflow

    cfg = DataConfig(
        shapes=ShapesConfig(image_size=48, num_train=3, num_val=1, num_test=1, min_size=10, max_size=24)
    )
    summary = ingest("shapes", tmp_path / "s", cfg=cfg, tracking=tracking_cfg)
    mlflow.set_tracking_uri(tracking_cfg.uri)
    (run,) = mlflow.search_runs(experiment_names=[tracking_cfg.experiment], output_format="list")
    inputs = run.inputs.dataset_inputs
    assert (
        len(inputs) == 1
        and inputs[0].dataset.digest == summary["dvc_md5"]
        and inputs[0].dataset.name == "shapes"
    )
    assert run.data.metrics["images_train"] == 3 and "report.total" in run.data.metrics
    assert run.data.params["data.shapes.image_size"] == "48"
