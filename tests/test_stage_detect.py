"""The detect stage end to end on a tiny shapes dataset: outputs, metrics, MLflow run, comparison, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from components.config import DataConfig, Params, ShapesConfig
from components.data.versioning import dvc_directory_md5
from components.errors import ConfigError, DataError
from components.metrics.detection import COCO_METRIC_NAMES


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory) -> Path:
    """A 12/4/4-image shapes dataset at 64 px (ingested once for the module)."""
    from components.data.ingest import ingest

    out = tmp_path_factory.mktemp("data") / "shapes"
    shapes = ShapesConfig(
        image_size=64, num_train=12, num_val=4, num_test=4, min_size=14, max_size=30, max_objects=2
    )
    ingest("shapes", out, cfg=DataConfig(shapes=shapes))
    return out


def _params(dataset: Path, out: Path, arch: str, **extra: object) -> Params:
    from components.config import validate_params

    section = {
        "backbone": {"arch": "convnet_small", "weights": None},
        "image_size": 64,
        "train": {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2, "device": "cpu"},
        **extra,
    }
    return validate_params(
        {"data": {"out": str(dataset)}, "detect": {"out": str(out), "architectures": [arch, "yolo"], arch: section}}
    )


def test_run_detect_writes_every_output_and_one_mlflow_run(tiny_shapes, tmp_path, tracking_cfg, monkeypatch):
    import mlflow

    from components.stages.detect import compare_detectors, run_detect

    monkeypatch.chdir(tmp_path)
    params = _params(tiny_shapes, tmp_path / "outputs" / "detect", "ssd")
    metrics = run_detect(params.detect, "ssd", params.augment, params.evaluate, tracking_cfg)

    out = tmp_path / "outputs" / "detect" / "ssd"
    for name in (
        "best.pt",
        "last.pt",
        "predictions_test.json",
        "detections.png",
        "pr_iou50.csv",
        "pr_iou75.csv",
        "pr_curves.png",
    ):
        assert (out / name).is_file(), name
    written = json.loads((tmp_path / "metrics" / "detect" / "ssd.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    test = written["test"]
    for key in (*COCO_METRIC_NAMES, "voc_map_50", "ms_per_image"):
        assert isinstance(test[key], float), key
    assert set(test["per_class"]) == set(json.loads((tiny_shapes / "dataset.json").read_text())["categories"])
    assert written["parameters"] > 0 and written["train_time_s"] > 0 and test["num_images"] == 4

    results = json.loads((out / "predictions_test.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score"} <= set(r) for r in results)
    header = (out / "pr_iou50.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "recall" and set(header[1:]) <= set(test["per_class"])

    mlflow.set_tracking_uri(tracking_cfg.uri)
    runs = mlflow.search_runs(experiment_names=[tracking_cfg.experiment], output_format="list")
    assert len(runs) == 1 and runs[0].data.tags["arch"] == "ssd"
    assert "test_map_50" in runs[0].data.metrics and runs[0].data.params["image_size"] == "64"

    # the comparison reads the metrics files; yolo has not run yet, so it is reported missing
    table = compare_detectors(params.detect)
    assert set(table["architectures"]) == {"ssd"} and table["missing"] == ["yolo"]
    assert table["architectures"]["ssd"]["map_50"] == test["map_50"]
    assert (tmp_path / "metrics" / "detect_comparison.json").is_file()
    assert (tmp_path / "outputs" / "detect" / "comparison.png").is_file()

    # the checkpoint records its data, not its run; the run id lives in the metrics and the state file
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["dataset"] == {"path": str(tiny_shapes), "md5": dvc_directory_md5(tiny_shapes)}
    assert "mlflow_run_id" not in ckpt and "train_time_s" not in ckpt
    assert all("time_s" not in h and "ms_per_image" not in h["val"] for h in ckpt["history"])
    state = json.loads((tmp_path / ".visionflow/stages/detect@ssd.json").read_text())
    assert state["mlflow_run_id"] == written["run_id"] == runs[0].info.run_id and state["status"] == "finished"

    # the same stage run again (a fresh start, a new MLflow run) writes the same bytes
    first = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    again = run_detect(params.detect, "ssd", params.augment, params.evaluate, tracking_cfg)
    assert again["run_id"] != metrics["run_id"]
    second = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert list(first) == list(second)
    assert [name for name in first if first[name] != second[name] and name.name != "last.pt"] == []
    # last.pt also records Python's global `random` state for an exact resume. In this process the session's
    # Prefect harness runs client threads that draw from that generator (measured: within a second), so only
    # here, beside them, it may differ; a stage in the pipeline is its own process (test_pipeline compares
    # the flow's and dvc repro's out hashes, last.pt included). Everything else in last.pt must be equal.
    last = [torch.load(io.BytesIO(files[Path("last.pt")]), map_location="cpu", weights_only=True) for files in (first, second)]
    for ckpt in last:
        ckpt["rng"].pop("python")
    assert _same(*last)


def _same(a, b) -> bool:
    """Deep equality of checkpoint contents (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_a_dataset_without_boxes_skips_the_stage_and_the_comparison_lists_it(tmp_path, tracking_cfg, monkeypatch):
    from components.stages.detect import compare_detectors, run_detect

    monkeypatch.chdir(tmp_path)
    masks_only = tmp_path / "membrane"
    masks_only.mkdir()
    manifest = {"tasks": ["semantic_segmentation"], "categories": ["membrane"], "splits": {"train": 2, "val": 1, "test": 1}, "source": "masks:/somewhere"}
    (masks_only / "dataset.json").write_text(json.dumps(manifest))
    out = tmp_path / "outputs" / "detect"
    (out / "ssd").mkdir(parents=True)
    (out / "ssd" / "best.pt").write_bytes(b"from an earlier run on other data")
    params = _params(masks_only, out, "ssd")
    result = run_detect(params.detect, "ssd", params.augment, params.evaluate, tracking_cfg)
    reason = f"{masks_only} has no boxes (mask folder binary masks only)"
    assert result == {"arch": "ssd", "status": "skipped", "reason": reason}
    assert json.loads((tmp_path / "metrics/detect/ssd.json").read_text()) == result
    assert [p.name for p in (out / "ssd").iterdir()] == ["SKIPPED.txt"]
    assert (out / "ssd" / "SKIPPED.txt").read_text() == f"skipped: {reason}\n"
    table = compare_detectors(params.detect)
    assert table["architectures"] == {} and table["skipped"] == {"ssd": reason} and table["missing"] == ["yolo"]
    assert (out / "comparison.png").stat().st_size > 0


def test_sliding_window_reports_windows_per_image(tiny_shapes, tmp_path, tracking_cfg, monkeypatch):
    from components.stages.detect import run_detect

    monkeypatch.chdir(tmp_path)
    params = _params(
        tiny_shapes, tmp_path / "out", "sliding_window", window_sizes=[32], stride_fraction=0.5, crop_size=16
    )
    metrics = run_detect(params.detect, "sliding_window", params.augment, params.evaluate, tracking_cfg)
    assert metrics["windows_per_image"] == 9  # 32 px windows every 16 px over 64 px: 3 x 3


def test_params_key_unknown_to_the_builder_is_a_config_error():
    from components.config import SlidingWindowConfig
    from components.stages.detect import detector_arguments

    with pytest.raises(ConfigError, match="has no argument") as info:
        detector_arguments("ssd", SlidingWindowConfig(), 3)  # window_sizes etc. mean nothing to SSD
    assert "window_sizes" in str(info.value) and info.value.record == "detect.ssd"


def test_a_detector_may_name_its_own_augment_preset_without_touching_the_shared_one(tiny_shapes):
    from components.config import AugmentConfig, RCNNConfig, YoloConfig
    from components.stages.detect import detection_datasets, detector_arguments, detector_augment

    shared = AugmentConfig(detection="yolo")
    assert detector_augment(shared, YoloConfig(augment=None)) is shared  # null: the shared preset
    own = detector_augment(shared, YoloConfig())  # YOLO's default: flips only
    assert own.detection == "basic" and shared.detection == "yolo"
    assert own.model_dump(exclude={"detection"}) == shared.model_dump(exclude={"detection"})
    assert "augment" not in detector_arguments("rcnn", RCNNConfig(augment="none"), 3)  # not a builder argument
    # "none": training images are the stored ones, so content-keyed proposal caches hit every epoch
    train = detection_datasets(tiny_shapes, detector_augment(shared, RCNNConfig(augment="none")), 64)["train"]
    first, second = train[0][0], train[0][0]
    assert first.shape == (3, 64, 64) and bool((first == second).all())


def test_dataset_errors_name_the_file(tmp_path):
    from components.stages.detect import read_detection_manifest

    with pytest.raises(DataError, match="no dataset.json") as info:
        read_detection_manifest(tmp_path)
    assert str(tmp_path) in str(info.value)
    manifest = {"tasks": ["classification"], "categories": ["a"], "splits": {"train": 1}}
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="no detection view") as info:
        read_detection_manifest(tmp_path)
    assert str(tmp_path / "dataset.json") in str(info.value)


def test_compare_without_any_run_is_a_data_error(tmp_path, monkeypatch):
    from components.stages.detect import compare_detectors

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no detection metrics"):
        compare_detectors(Params().detect)
