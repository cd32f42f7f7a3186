"""The segment stage end to end on a tiny shapes dataset: outputs, MLflow run, resume, comparison, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from components.config import load_params
from components.errors import ConfigError, DataError
from components.stages.segment import (
    backbone_param_groups,
    compare_segmenters,
    pixel_class_frequencies,
    render_semantic_map,
    run_segment,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.shapes.image_size=64",
    "data.shapes.num_train=12",
    "data.shapes.num_val=4",
    "data.shapes.num_test=4",
    "data.shapes.min_size=14",
    "data.shapes.max_size=30",
    "data.shapes.max_objects=2",
]


def tiny_params(work: Path, **extra: str):
    """params.yaml with a tiny shapes dataset under ``work`` and 1-2 quick epochs per architecture."""
    overrides = [
        *TINY,
        f"data.out={work / 'shapes'}",
        f"segment.out={work / 'outputs/segment'}",
        "segment.overlays=2",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        "tracking.experiment=segment-test",
        f"tracking.artifact_location={(work / 'mlartifacts').as_uri()}",
    ]
    for arch in ("fcn", "unet", "mask_rcnn"):
        overrides += [
            f"segment.{arch}.image_size=64",
            f"segment.{arch}.backbone.arch=convnet_small",  # the small CPU backbone keeps the test fast
            f"segment.{arch}.backbone.weights=null",
            f"segment.{arch}.train.epochs=2",
            f"segment.{arch}.train.batch_size=4",
            f"segment.{arch}.train.device=cpu",
            f"segment.{arch}.train.threads=1",
            f"segment.{arch}.train.max_steps_per_epoch=2",
        ]
    overrides += ["segment.unet.base_channels=8", "segment.unet.depth=3", "segment.mask_rcnn.train.epochs=1"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_params(ROOT / "params.yaml", overrides)


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    """Ingest a tiny shapes set, run the stage for all three architectures once; yields ``(params, work, results)``."""
    from components.data.ingest import ingest

    work = tmp_path_factory.mktemp("segment")
    old_cwd, old_uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(work)
    try:
        params = tiny_params(work)
        ingest("shapes", work / "shapes", cfg=params.data)
        torch.manual_seed(0)
        results = {
            arch: run_segment(params.segment, arch, params.augment, params.tracking)
            for arch in ("fcn", "unet", "mask_rcnn")
        }
        yield params, work, results
    finally:
        os.chdir(old_cwd)
        if old_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


@pytest.mark.parametrize("arch", ["fcn", "unet", "mask_rcnn"])
def test_stage_writes_metrics_checkpoint_and_overlays(stage_runs, arch):
    from components.engine import load_model

    params, work, results = stage_runs
    metrics = json.loads((work / "metrics" / "segment" / f"{arch}.json").read_text())
    assert metrics == json.loads(json.dumps(results[arch]))  # the returned dict is what was written
    test = metrics["test"]
    assert 0.0 <= test["miou"] <= 1.0 and 0.0 <= test["pixel_accuracy"] <= 1.0
    assert set(test["per_class_iou"]) == {
        "background",
        *json.loads((work / "shapes/dataset.json").read_text())["categories"],
    }
    assert test["ms_per_image"] > 0 and test["num_images"] == 4
    assert metrics["parameters"] > 0 and metrics["train_time_s"] > 0
    assert metrics["epochs"] == (1 if arch == "mask_rcnn" else 2)
    if arch == "mask_rcnn":
        for iou_type in ("segm", "bbox"):
            assert {"map", "map_50", "map_75", "mar_100", "per_class"} <= set(test[iou_type])
    out = work / "outputs/segment" / arch
    assert (out / "overlays.png").stat().st_size > 1000
    model, ckpt = load_model(out / "best.pt")  # rebuilt from the file alone, no backbone checkpoint needed
    assert ckpt["task"] == "segmentation" and ckpt["model_name"] == arch and ckpt["image_size"] == 64
    assert ckpt["model_args"].get("backbone_weights") is None
    from components.data.versioning import dvc_directory_md5

    assert ckpt["dataset"] == {"path": str(work / "shapes"), "md5": dvc_directory_md5(work / "shapes")}
    assert "mlflow_run_id" not in ckpt and all("ms_per_image" not in h["val"] for h in ckpt["history"])
    state = json.loads((work / ".visionflow/stages" / f"segment@{arch}.json").read_text())
    assert state["mlflow_run_id"] == metrics["run_id"] and state["out"] == str(out)


def test_stage_logs_one_mlflow_run_per_architecture(stage_runs):
    import mlflow

    params, work, results = stage_runs
    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["arch"] for r in runs) == ["fcn", "mask_rcnn", "unet"]
    for run in runs:
        arch = run.data.tags["arch"]
        assert run.data.metrics["test_miou"] == pytest.approx(results[arch]["test"]["miou"])
        assert "val_miou" in run.data.metrics and "train_loss" in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
            a.path for a in client.list_artifacts(run.info.run_id, "plots")
        }
        assert f"{arch}.json" in artifacts and "plots/overlays.png" in artifacts


def test_resume_of_a_finished_run_trains_nothing_and_reuses_its_mlflow_run(stage_runs):
    import mlflow

    params, work, results = stage_runs
    cwd = os.getcwd()
    os.chdir(work)
    try:
        again = run_segment(params.segment, "fcn", params.augment, params.tracking, resume=True)
    finally:
        os.chdir(cwd)
    assert again["epochs"] == results["fcn"]["epochs"]
    assert again["test"]["miou"] == pytest.approx(results["fcn"]["test"]["miou"])
    assert again["run_id"] == results["fcn"]["run_id"]  # re-opened from .visionflow/stages/segment@fcn.json
    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(params.tracking.experiment).experiment_id], "tags.arch = 'fcn'"
    )
    assert len(runs) == 1


def test_compare_segmenters_writes_table_and_png(stage_runs):
    params, work, results = stage_runs
    cwd = os.getcwd()
    os.chdir(work)
    try:
        table = compare_segmenters(params.segment)
    finally:
        os.chdir(cwd)
    assert set(table["architectures"]) == {"fcn", "unet", "mask_rcnn"} and table["missing"] == []
    assert table["architectures"]["unet"]["miou"] == pytest.approx(results["unet"]["test"]["miou"])
    assert "segm_map" in table["architectures"]["mask_rcnn"]
    assert (
        json.loads((work / "metrics/segment_comparison.json").read_text())["architectures"].keys()
        == table["architectures"].keys()
    )
    assert (work / "outputs/segment/comparison.png").stat().st_size > 1000


def test_compare_without_any_run_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no segmentation metrics"):
        compare_segmenters(tiny_params(tmp_path).segment)


def test_stage_errors_name_the_file_and_the_fix(tmp_path, monkeypatch, tracking_cfg):
    monkeypatch.chdir(tmp_path)
    params = tiny_params(tmp_path)
    with pytest.raises(DataError, match="dataset.json") as err:
        run_segment(params.segment, "fcn", params.augment, tracking_cfg)
    assert err.value.fix and "ingest" in err.value.fix
    with pytest.raises(ConfigError):
        run_segment(params.segment, "segnet", params.augment, tracking_cfg)


def _manifest(folder: Path, tasks: list[str], source: str) -> Path:
    folder.mkdir()
    manifest = {"tasks": tasks, "categories": ["cell"], "splits": {"train": 2, "val": 1, "test": 1}, "source": source}
    (folder / "dataset.json").write_text(json.dumps(manifest))
    return folder


def test_a_dataset_without_the_masks_an_architecture_needs_skips_it(tmp_path, monkeypatch, tracking_cfg):
    monkeypatch.chdir(tmp_path)
    # boxes-only VOC: no segmenter can train; every one is skipped, exit 0, and the comparison lists them
    voc = _manifest(tmp_path / "voc", ["classification", "detection"], "voc:/data/VOCdevkit")
    params = tiny_params(tmp_path, **{"data.out": str(voc)})
    out = Path(params.segment.out)
    for arch in ("fcn", "unet", "mask_rcnn"):
        result = run_segment(params.segment, arch, params.augment, tracking_cfg)
        reason = f"{voc} has no segmentation masks (VOC boxes only)"
        assert result == {"arch": arch, "status": "skipped", "reason": reason}
        assert json.loads((tmp_path / f"metrics/segment/{arch}.json").read_text()) == result
        assert sorted(p.name for p in (out / arch).iterdir()) == ["SKIPPED.txt"]
        assert (out / arch / "SKIPPED.txt").read_text() == f"skipped: {reason}\n"
    table = compare_segmenters(params.segment)
    assert table["architectures"] == {} and set(table["skipped"]) == {"fcn", "unet", "mask_rcnn"} and table["missing"] == []
    assert (out / "comparison.png").stat().st_size > 0
    # a semantic-only dataset (binary masks, like the membranes) feeds FCN and UNet, not Mask R-CNN
    semantic_only = _manifest(tmp_path / "semantic", ["semantic_segmentation"], "masks:/data/membrane")
    params = tiny_params(tmp_path, **{"data.out": str(semantic_only)})
    result = run_segment(params.segment, "mask_rcnn", params.augment, tracking_cfg)
    assert result["status"] == "skipped" and "no instance masks (mask folder binary masks only)" in result["reason"]
    assert "fcn and unet" in result["reason"]


@pytest.mark.parametrize("arch", ["fcn", "unet", "mask_rcnn"])
def test_backbone_param_groups_slow_down_only_the_backbone(arch):
    from components.engine import build_optimizer
    from components.models import get_model

    kwargs = {"pretrained_encoder": True, "base_channels": 8} if arch == "unet" else {}
    model = get_model("segmentation", arch, num_classes=3, **kwargs)
    assert backbone_param_groups(model, 1.0) is None  # one group: the plain recipe
    groups = backbone_param_groups(model, 0.1)
    body = model.backbone.body if arch == "mask_rcnn" else model.backbone  # Mask R-CNN's FPN is new
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in body.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    cfg = load_params(ROOT / "params.yaml").segment.arch(arch).train
    lrs = {g["name"].split(".")[0]: g["lr"] for g in build_optimizer(model, cfg, groups).param_groups}
    assert lrs == pytest.approx({"backbone": 0.1 * cfg.lr, "head": cfg.lr})
    assert backbone_param_groups(get_model("segmentation", "unet", num_classes=3, base_channels=8, depth=2), 0.1) is None


def test_pixel_class_frequencies_count_the_stored_masks(tmp_path):
    from PIL import Image

    (tmp_path / "masks" / "train").mkdir(parents=True)
    mask = torch.zeros(4, 5, dtype=torch.uint8)
    mask[0, :2] = 2
    mask[3, 4] = 255  # ignored
    Image.fromarray(mask.numpy()).save(tmp_path / "masks" / "train" / "a.png")
    dataset = type("Split", (), {"root": tmp_path, "split": "train", "files": ["a.jpg"]})()
    freq = pixel_class_frequencies(dataset, 3)
    # 17 background, 0 class-1, 2 class-2 pixels, plus one pseudo-count each (a finite log-prior)
    assert freq == pytest.approx([18 / 22, 1 / 22, 3 / 22])


def test_render_semantic_map_paints_confident_instances_most_confident_last():
    masks = torch.zeros(3, 1, 6, 6)
    masks[0, 0, :4, :4] = 0.9  # label 1, score 0.6
    masks[1, 0, 2:, 2:] = 0.8  # label 2, score 0.9: wins the overlap
    masks[2, 0, :, :] = 0.7  # label 3, score 0.2: below the threshold
    detections = {"masks": masks, "labels": torch.tensor([1, 2, 3]), "scores": torch.tensor([0.6, 0.9, 0.2])}
    semantic = render_semantic_map(detections, (6, 6), score_threshold=0.5, mask_threshold=0.5)
    expected = torch.zeros(6, 6, dtype=torch.int64)
    expected[:4, :4] = 1
    expected[2:, 2:] = 2
    assert torch.equal(semantic, expected)
    empty = {
        "masks": torch.zeros(0, 1, 6, 6),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
    }
    assert torch.equal(
        render_semantic_map(empty, (6, 6), score_threshold=0.5, mask_threshold=0.5),
        torch.zeros(6, 6, dtype=torch.int64),
    )


MEMBRANE = Path(__file__).resolve().parents[2] / "shared" / "data" / "membrane"


@pytest.mark.slow
@pytest.mark.skipif(not MEMBRANE.is_dir(), reason="the ISBI 2012 membrane data is not on this machine")
def test_unet_on_the_isbi_membranes(tmp_path, monkeypatch):
    """configs/membrane.yaml end to end: UNet with elastic + flip augmentation, scored on 6 held-out slices.

    About 40 epochs of 21 slices at 256x256: roughly 30-60 minutes on a shared 2-core CPU.
    """
    from components.data.ingest import ingest

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(
        ROOT / "configs/membrane.yaml",
        [f"data.out={tmp_path / 'membrane'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
    )
    ingest(f"masks:{MEMBRANE}", tmp_path / "membrane", cfg=params.data)
    metrics = run_segment(params.segment, "unet", params.augment, params.tracking)
    test = metrics["test"]
    assert test["num_images"] == 7  # the hash split of the 30 slices: 18 train, 5 val, 7 test
    assert test["pixel_accuracy"] >= 0.88
    assert test["per_class_iou"]["membrane"] >= 0.6
    assert (tmp_path / "outputs/membrane/unet/overlays.png").is_file()
