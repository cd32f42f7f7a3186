"""`visionflow predict --coco` then `visionflow evaluate` reproduce the detect stage's own test metrics (to 1e-6).

A YOLO v1 trained a few steps by the real stage (``run_detect``) on 80-pixel shapes with a 64-pixel
input, so the resize and the mapping of boxes back to the image's pixels are exercised. A registry
URI (``models:/NAME@champion``) gives the checkpoint's records to the bit
(``tests/test_registry.py::test_predict_files_with_registry_uri_and_checkpoint``), so this holds for it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.config import DataConfig, ShapesConfig, validate_params
from flows.cli import main

#: pycocotools' numbers over all areas (the area ranges are left out: the stage ranks its objects by the
#: resized box area, COCO files by the annotation's own area, the mask's)
ALL_AREAS = ("map", "map_50", "map_75", "mar_1", "mar_10", "mar_100")


@pytest.fixture(scope="module")
def trained_yolo(tmp_path_factory, mlflow_db_template):
    """``(work dir, dataset, stage metrics)`` of a YOLO trained by the detect stage in a temporary folder."""
    import os
    import shutil

    from components.config import TrackingConfig
    from components.data.ingest import ingest
    from components.stages.detect import run_detect

    work = tmp_path_factory.mktemp("detect")
    shutil.copy(mlflow_db_template, work / "mlflow.db")
    data = work / "data" / "shapes"
    ingest("shapes", data, cfg=DataConfig(shapes=ShapesConfig(image_size=80, num_train=8, num_val=4, num_test=12, min_size=14,
                                                                max_size=36, max_objects=3)))
    section = {"backbone": {"arch": "convnet_small", "weights": None}, "image_size": 64, "S": 4,
               "train": {"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 1, "device": "cpu", "amp": False, "threads": 1}}
    params = validate_params({"data": {"out": str(data)}, "detect": {"out": str(work / "outputs/detect"), "architectures": ["yolo"], "yolo": section}})
    tracking = TrackingConfig(uri=f"sqlite:///{work / 'mlflow.db'}", experiment="predict", artifact_location=(work / "mlartifacts").as_uri())
    old = os.getcwd()
    os.chdir(work)  # the stage writes metrics/detect/yolo.json under the working folder
    try:
        metrics = run_detect(params.detect, "yolo", params.augment, params.evaluate, tracking)
    finally:
        os.chdir(old)
    assert metrics["test"]["map_50"] > 0, "the comparison needs some true positives"
    return work, data, metrics


def _evaluate(gt: Path, preds: Path, out: Path) -> dict:
    assert main(["evaluate", "--gt", str(gt), "--pred", str(preds), "--out", str(out)]) == 0
    return json.loads(out.read_text())["bbox"]


def test_predict_then_evaluate_reproduces_the_stage_test_map(trained_yolo, tmp_path, capsys):
    work, data, metrics = trained_yolo
    gt = data / "annotations" / "instances_test.json"
    stage = metrics["test"]

    preds = tmp_path / "preds.json"
    assert main(["predict", "--model", str(work / "outputs/detect/yolo/best.pt"), str(data / "images" / "test"),
                 "--coco", str(gt), "--out", str(preds)]) == 0
    capsys.readouterr()
    results = json.loads(preds.read_text())
    assert isinstance(results, list) and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    got = _evaluate(gt, preds, tmp_path / "metrics.json")
    for key in ALL_AREAS:
        assert got[key] == pytest.approx(stage[key], abs=1e-6), key
    assert got["voc"]["map_50"] == pytest.approx(stage["voc_map_50"], abs=1e-6)
    for name, row in stage["per_class"].items():
        assert got["per_class"][name]["ap"] == pytest.approx(row["ap"], abs=1e-6), name
