"""register: the right model or none, one version per distinct checkpoint, champion and challenger on the same test data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_tiny_checkpoint

from components.config import DataConfig, ShapesConfig, load_params

REPO = Path(__file__).resolve().parents[1]
NAME = "visionflow-detector-yolo"
YOLO_ARGS = {"image_size": 64, "S": 4, "hidden": 32}


def tiny_shapes(out: Path, classes: list[str], *, seed: int = 0) -> str:
    """A canonical shapes dataset of 4/2/4 images at 64 px; returns its DVC md5."""
    from components.data.ingest import ingest

    cfg = DataConfig(seed=seed, shapes=ShapesConfig(image_size=64, num_train=4, num_val=2, num_test=4, classes=classes, min_size=10, max_size=24, texture=False))
    return ingest("shapes", out, cfg=cfg)["dvc_md5"]


def train_yolo(dataset: Path, md5: str | None, *, revision: int = 0, categories: list[str] | None = None, metric: float = 0.5, status: str | None = None) -> Path:
    """What the detect stage leaves behind: ``outputs/detect/yolo/best.pt`` (random weights) and ``metrics/detect/yolo.json``."""
    cats = categories or json.loads((dataset / "dataset.json").read_text())["categories"]
    best = Path("outputs/detect/yolo/best.pt")
    record = {"path": str(dataset), "md5": md5} if md5 else str(dataset)
    write_tiny_checkpoint(best, task="detection", model_name="yolo", model_args={"num_classes": len(cats), **YOLO_ARGS}, categories=cats,
                          image_size=64, dataset=record, revision=revision)
    Path("metrics/detect").mkdir(parents=True, exist_ok=True)
    tree = {"arch": "yolo", "dataset": str(dataset), "test": {"bbox": {"map_50": metric}}, "checkpoint": str(best)}
    Path("metrics/detect/yolo.json").write_text(json.dumps({**tree, **({"status": status} if status else {})}))
    return best


def register(tracking_cfg, dataset: str, *extra: str) -> dict:
    from components.stages.register import run_register

    params = load_params(REPO / "params.yaml", [
        f"tracking.uri={tracking_cfg.uri}", f"tracking.experiment={tracking_cfg.experiment}", f"tracking.artifact_location={tracking_cfg.artifact_location}",
        f"data.out={dataset}", "detect.architectures=[yolo]", "segment.architectures=[]", "finetune.strategies=[fine_tuning]", *extra,
    ])
    return run_register(params)


def client(tracking_cfg):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_cfg.uri, registry_uri=tracking_cfg.uri)


def versions(tracking_cfg) -> list:
    return sorted(client(tracking_cfg).search_model_versions(f"name='{NAME}'"), key=lambda mv: int(mv.version))


# --------------------------------------------------------------------------- 1. the right model, or none


@pytest.mark.parametrize("other", ["categories", "data"])
def test_a_model_of_dataset_a_is_refused_when_the_params_point_to_dataset_b(tracking_cfg, tmp_path, monkeypatch, other):
    monkeypatch.chdir(tmp_path)
    md5_a = tiny_shapes(Path("data/A"), ["circle", "square"])
    # B: other categories, or the same categories with other images (another seed: another DVC hash)
    tiny_shapes(Path("data/B"), ["circle", "square", "triangle"] if other == "categories" else ["circle", "square"], seed=1)
    train_yolo(Path("data/A"), md5_a)
    (Path("metrics/detect/yolo.json")).write_text(json.dumps({"arch": "yolo", "test": {"bbox": {"map_50": 0.5}}}))  # metrics naming no dataset

    report = register(tracking_cfg, "data/B")
    reason = report["refused"][NAME]
    assert "data/A" in reason and "data/B" in reason, reason
    assert ("categories" in reason) if other == "categories" else (md5_a in reason)
    assert NAME not in report["registered"] and versions(tracking_cfg) == []
    assert json.loads(Path("metrics/register.json").read_text())["refused"][NAME] == reason

    assert NAME in register(tracking_cfg, "data/A")["registered"]  # the same model on its own data registers


def test_metrics_of_another_dataset_or_checkpoint_are_refused_and_skipped_stages_are_skipped(tracking_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    md5 = tiny_shapes(Path("data/A"), ["circle", "square"])
    train_yolo(Path("data/A"), md5)
    assert "written for dataset data/A" in register(tracking_cfg, "data/B")["refused"][NAME]  # params point elsewhere
    Path("metrics/detect/yolo.json").write_text(json.dumps({"test": {"bbox": {"map_50": 0.5}}, "checkpoint": "elsewhere/best.pt"}))
    assert "outside detect.out" in register(tracking_cfg, "data/A")["refused"][NAME]
    Path("metrics/detect/yolo.json").write_text(json.dumps({"arch": "yolo", "status": "skipped", "reason": "data/A has no boxes"}))
    report = register(tracking_cfg, "data/A")
    assert report["skipped"] == {NAME: "data/A has no boxes"} and NAME not in report["refused"]
    assert versions(tracking_cfg) == []


def test_a_version_carries_the_lineage_of_its_training_run(tracking_cfg, tmp_path, monkeypatch):
    from components.tracking import start_run

    monkeypatch.chdir(tmp_path)
    md5 = tiny_shapes(Path("data/A"), ["circle", "square"])
    with start_run(tracking_cfg, run_name="detect-yolo") as run:
        run.set_tags({"visionflow.git_commit": "f" * 40, "visionflow.git_dirty": "false"})
    train_yolo(Path("data/A"), md5)
    tree = json.loads(Path("metrics/detect/yolo.json").read_text())
    Path("metrics/detect/yolo.json").write_text(json.dumps({**tree, "run_id": run.run_id}))
    register(tracking_cfg, "data/A")
    mv = versions(tracking_cfg)[0]
    assert mv.tags["visionflow.git_commit"] == "f" * 40 and mv.tags["mlflow.source.git.commit"] == "f" * 40  # the training's, not register's
    assert mv.tags["visionflow.data_hash"] == md5 and mv.tags["visionflow.data_hash_verified"] == "true"
    assert mv.tags["visionflow.training_run_id"] == run.run_id


# --------------------------------------------------------------------------- 2. the registry grows only when a model changes


def test_same_checkpoint_registers_once_a_changed_one_again(tracking_cfg, tmp_path, monkeypatch):
    from components.stages.register import file_sha256

    monkeypatch.chdir(tmp_path)
    md5 = tiny_shapes(Path("data/A"), ["circle", "square"])
    best = train_yolo(Path("data/A"), md5)
    first = register(tracking_cfg, "data/A")
    assert first["registered"][NAME]["version"] == "1"
    again = register(tracking_cfg, "data/A")
    assert NAME not in again["registered"] and again["unchanged"][NAME]["reason"] == "unchanged: version 1"
    assert json.loads(Path("metrics/register.json").read_text())["models"][NAME] == {"status": "unchanged", "version": "1", "reason": "unchanged: version 1"}
    assert len(versions(tracking_cfg)) == 1
    assert versions(tracking_cfg)[0].tags["visionflow.checkpoint_sha256"] == file_sha256(best)

    train_yolo(Path("data/A"), md5, revision=1)  # new bytes
    assert register(tracking_cfg, "data/A")["registered"][NAME]["version"] == "2"
    assert len(versions(tracking_cfg)) == 2


# --------------------------------------------------------------------------- 3. champion and challenger on the same test data


def test_champion_is_evaluated_on_the_candidates_test_split(tracking_cfg, tmp_path, monkeypatch, one_torch_thread):
    import torch

    from components.data.datasets import detection_collate
    from components.engine import build_loader, load_model
    from components.stages.detect import detection_datasets, evaluate_detector

    monkeypatch.chdir(tmp_path)
    md5 = tiny_shapes(Path("data/A"), ["circle", "square"])
    best = train_yolo(Path("data/A"), md5, metric=0.9)
    register(tracking_cfg, "data/A")
    params = load_params(REPO / "params.yaml")
    model, _ = load_model(best)
    loader = build_loader(detection_datasets(Path("data/A"), params.augment, 64)["test"], params.detect.yolo.train, train=False,
                          collate_fn=detection_collate, batch_size=8)
    with torch.no_grad():
        expected = evaluate_detector(model, loader, torch.device("cpu"), categories=["circle", "square"])["map_50"]

    train_yolo(Path("data/A"), md5, revision=1, metric=expected + 0.5)  # the challenger's own test number
    entry = register(tracking_cfg, "data/A")["registered"][NAME]
    assert entry["comparison"] == "evaluated" and entry["champion_version_before"] == "1"
    assert entry["champion_value"] == pytest.approx(expected) and entry["candidate_value"] == pytest.approx(expected + 0.5)
    assert entry["test_data_hash"] == md5 and entry["promoted"] is True and entry["decision"] == "promoted"
    tags = versions(tracking_cfg)[1].tags
    assert float(tags["gate.champion_value"]) == pytest.approx(expected) and tags["gate.test_data_hash"] == md5
    assert tags["gate.decision"] == "promoted" and float(tags["gate.candidate_value"]) == pytest.approx(expected + 0.5)
    on_disk = json.loads(Path("metrics/register.json").read_text())["registered"][NAME]
    assert {k: on_disk[k] for k in ("champion_value", "candidate_value", "test_data_hash", "decision")} == {
        k: entry[k] for k in ("champion_value", "candidate_value", "test_data_hash", "decision")}

    train_yolo(Path("data/A"), md5, revision=2, metric=0.0)  # worse than the champion on the same data: kept
    worse = register(tracking_cfg, "data/A")["registered"][NAME]
    assert worse["promoted"] is False and worse["decision"] == "kept" and worse["comparison"] == "evaluated"
    assert str(client(tracking_cfg).get_model_version_by_alias(NAME, "champion").version) == "2"


def test_a_champion_of_other_categories_is_incomparable_and_the_rule_decides(tracking_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    md5_a = tiny_shapes(Path("data/A"), ["circle", "square"])
    md5_b = tiny_shapes(Path("data/B"), ["circle", "square", "triangle"], seed=1)
    train_yolo(Path("data/A"), md5_a, metric=0.9)
    register(tracking_cfg, "data/A")

    train_yolo(Path("data/B"), md5_b, metric=0.1)  # far below the champion's recorded 0.9, on other data
    entry = register(tracking_cfg, "data/B")["registered"][NAME]
    assert entry["comparison"] == "incomparable" and entry["champion_value"] is None and entry["promoted"] is True
    assert "['circle', 'square']" in entry["reason"] and "on_incomparable=promote" in entry["reason"]
    assert entry["categories_changed"] == "v1: ['circle', 'square'] -> ['circle', 'square', 'triangle']"
    mv = versions(tracking_cfg)[1]
    assert mv.tags["visionflow.categories_changed"] == entry["categories_changed"] and "class list changed" in mv.description
    assert mv.tags["gate.comparison"] == "incomparable" and mv.tags["gate.champion_value"] == ""

    train_yolo(Path("data/A"), md5_a, revision=1, metric=0.95)  # back to A: the champion (B's) cannot be measured there
    kept = register(tracking_cfg, "data/A", "register.on_incomparable=keep")["registered"][NAME]
    assert kept["comparison"] == "incomparable" and kept["promoted"] is False
    assert str(client(tracking_cfg).get_model_version_by_alias(NAME, "champion").version) == "2"


def test_decide_promotion_incomparable_applies_the_rule():
    from components.config import Gate
    from components.tracking import decide_promotion

    gate = Gate(metric="m")
    for rule, promoted in (("promote", True), ("keep", False)):
        d = decide_promotion(model="x", candidate_version="2", candidate_value=0.1, champion_version="1", champion_value=0.9, gate=gate,
                             incomparable="other categories", on_incomparable=rule)
        assert d.promoted is promoted and d.champion_value is None and d.comparison == "incomparable" and "other categories" in d.reason
        assert d.as_tags()["gate.decision"] == ("promoted" if promoted else "kept")


@pytest.mark.parametrize("family", ["segmenter", "classifier"])
def test_segmenter_and_classifier_champions_are_evaluated_too(tracking_cfg, tmp_path, monkeypatch, one_torch_thread, family):
    from components.stages.register import run_register

    monkeypatch.chdir(tmp_path)
    md5 = tiny_shapes(Path("data/A"), ["circle", "square"])
    cats = ["circle", "square"]
    Path("metrics/detect").mkdir(parents=True)
    Path("metrics/segment").mkdir(parents=True)
    if family == "segmenter":
        name, best, spec = "visionflow-segmenter-fcn", Path("outputs/segment/fcn/best.pt"), {"model_name": "fcn", "model_args": {"num_classes": 3}, "image_size": 64}
        task, metrics_file, tree = "segmentation", "segment/fcn.json", {"arch": "fcn", "dataset": "data/A", "test": {"miou": 0.9}}
    else:
        name, best = "visionflow-classifier", Path("outputs/finetune/fine_tuning/best.pt")
        spec = {"model_name": "classifier", "model_args": {"num_classes": 2, "backbone": "convnet_small", "weights": None}, "image_size": 32}
        task, metrics_file = "classification", "finetune.json"
        tree = {"dataset": "data/A", "strategies": {"fine_tuning": {"accuracy": 0.9, "checkpoint": str(best)}}}
    params = load_params(REPO / "params.yaml", [
        f"tracking.uri={tracking_cfg.uri}", f"tracking.experiment={tracking_cfg.experiment}", f"tracking.artifact_location={tracking_cfg.artifact_location}",
        "data.out=data/A", "finetune.dataset=data/A", "detect.architectures=[]", "segment.architectures=[fcn]", "finetune.strategies=[fine_tuning]",
    ])
    for revision in (0, 1):
        write_tiny_checkpoint(best, task=task, categories=cats, dataset={"path": "data/A", "md5": md5}, revision=revision, **spec)
        Path("metrics", metrics_file).write_text(json.dumps(tree))
        entry = run_register(params)["registered"][name]
    assert entry["version"] == "2" and entry["comparison"] == "evaluated", entry
    assert entry["champion_value"] is not None and entry["test_data_hash"] == md5 and entry["promoted"] is True
