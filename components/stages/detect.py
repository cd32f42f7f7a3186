"""The ``detect`` stage: train and evaluate one detector, and compare them all.

``visionflow detect --arch A`` calls :func:`run_detect`; ``visionflow detect --compare`` calls
:func:`compare_detectors`. Every architecture (sliding window, OverFeat, YOLO v1, SSD, Faster
R-CNN, RetinaNet, R-CNN, Fast R-CNN) is built by name from its params section, honours the same
detection contract, trains with the shared engine on the joint box-aware augmentation preset and
is scored by the project's evaluator on the test split, so the numbers are comparable.

Outputs per architecture:

* ``outputs/detect/<arch>/``: ``best.pt`` / ``last.pt`` (engine), ``predictions_test.json`` (COCO
  results: ``image_id, category_id, bbox xywh, score``), ``detections.png`` (test images with
  true boxes in white and predicted boxes in their class colour), ``pr_iou50.csv`` /
  ``pr_iou75.csv`` (precision-recall curves in DVC's plots format: ``recall`` then one column
  per class) and ``pr_curves.png``;
* ``metrics/detect/<arch>.json``: COCO's 12 numbers, VOC AP@0.5 (all-point), per-class AP,
  inference milliseconds per image, parameters, training time (and windows per image for the
  sliding window), the MLflow run id;
* one MLflow run per architecture with the params, per-epoch metrics, test metrics and files;
  its id is kept in ``.visionflow/stages/detect@<arch>.json``, from which ``--resume`` re-opens it.

Everything under ``outputs/detect/<arch>/`` is a function of code, data and params: the same
stage run again writes the same bytes (timings and run ids live in the metrics and state files).

A dataset without boxes cannot feed a detector: the stage is then *skipped*, not failed. It
writes ``metrics/detect/<arch>.json`` = ``{"arch", "status": "skipped", "reason"}`` and an out
folder holding only ``SKIPPED.txt``, and exits 0; the comparison lists it with its reason.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from components.config import (
    METRICS_DIR,
    AugmentConfig,
    DetectConfig,
    DetectorConfig,
    EvaluateConfig,
    TrackingConfig,
    stage_metrics_path,
)
from components.engine import log_line
from components.errors import ConfigError, DataError
from components.io import write_json
from components.metrics.detection import COCO_METRIC_NAMES as COCO_NAMES
from components.plots import draw_detections, plot_detector_comparison
from components.stages.runner import fit_summary, reload_best, skip_stage, training_run, worker_result

_BACKBONE_KEYS = ("backbone", "train", "augment")  # params keys that are not builder arguments

if TYPE_CHECKING:
    from components.tracking import RunContext


# --------------------------------------------------------------------------- dataset


#: how a source's labels are described in a skip reason, by ``dataset.json``'s source format
SOURCE_LABELS = {"voc": "VOC", "yolo": "YOLO", "coco": "COCO", "imagefolder": "ImageFolder", "masks": "mask folder", "shapes": "shapes"}


def describe_labels(manifest: Mapping[str, Any]) -> str:
    """What labels a canonical dataset has, in a few words: ``"VOC boxes only"``, ``"mask folder binary masks only"``.

    Read from ``dataset.json``: ``tasks`` (which views the ingest wrote: ``detection`` = boxes,
    ``instance_segmentation`` = instance masks, ``semantic_segmentation`` = class masks,
    ``classification``) and the format of ``source``.
    """
    tasks = set(manifest.get("tasks", []))
    fmt = str(manifest.get("source") or "").split(":", 1)[0]
    name = SOURCE_LABELS.get(fmt, "")
    if "instance_segmentation" in tasks:
        what = "boxes and instance masks"
    elif "detection" in tasks and "semantic_segmentation" in tasks:
        what = "boxes and class masks"
    elif "detection" in tasks:
        what = "boxes only"
    elif "semantic_segmentation" in tasks:
        what = "binary masks only" if len(manifest.get("categories", [])) == 1 else "class masks only"
    elif "classification" in tasks:
        what = "image-level labels only"
    else:
        what = f"tasks {sorted(tasks)}"
    return f"{name} {what}".strip()


def detection_skip_reason(root: Path, manifest: Mapping[str, Any]) -> str | None:
    """Why a detector cannot train on this dataset (no boxes), or None when it can."""
    if "detection" in manifest.get("tasks", []):
        return None
    return f"{root} has no boxes ({describe_labels(manifest)})"


def read_detection_manifest(root: Path) -> dict[str, Any]:
    """The canonical dataset's ``dataset.json``, checked for a detection view with train/val/test images.

    Raises:
        DataError: no manifest, no detection view, or an empty split.
    """
    from components.data.datasets import load_manifest, require_splits

    manifest_path = root / "dataset.json"
    manifest = load_manifest(root)
    if "detection" not in manifest.get("tasks", []):
        raise DataError(
            f"the dataset has no detection view (tasks: {manifest.get('tasks')})",
            file=manifest_path,
            record="tasks",
            fix="ingest a source with boxes (shapes, coco:, voc:, yolo:)",
        )
    require_splits(manifest, manifest_path)
    return manifest


def detector_augment(augment: AugmentConfig, acfg: DetectorConfig) -> AugmentConfig:
    """The augmentation params a detector trains with: ``augment`` with its preset replaced by ``acfg.augment`` if set.

    The ``augment:`` section is shared with the other stages; a detector that needs a milder
    policy than ``augment.detection`` (a short schedule, or proposals cached by image content)
    names its own preset instead of changing the shared one.
    """
    if acfg.augment is None:
        return augment
    return augment.model_copy(update={"detection": acfg.augment})


def detection_datasets(root: Path, augment: AugmentConfig, image_size: int) -> dict[str, Any]:
    """``DetectionDataset`` per split: train with the ``augment.detection`` preset, val/test with the eval preset."""
    from components.augment import build_transforms
    from components.data.datasets import DetectionDataset

    return {
        split: DetectionDataset(
            root,
            split,
            transforms=build_transforms("detection", augment, train=split == "train", image_size=image_size),
        )
        for split in ("train", "val", "test")
    }


def plain_targets(
    targets: Sequence[Mapping[str, Any]], device: torch.device | str = "cpu"
) -> list[dict[str, Any]]:
    """Targets as plain tensors on ``device`` (``BoundingBoxes`` unwrapped; the models' contract is plain tensors)."""
    out = []
    for t in targets:
        d: dict[str, Any] = {}
        for k, v in t.items():
            d[k] = v.as_subclass(Tensor).to(device) if isinstance(v, Tensor) else v
        out.append(d)
    return out


# --------------------------------------------------------------------------- models


def detector_arguments(arch: str, acfg: DetectorConfig, num_classes: int) -> dict[str, Any]:
    """Builder keyword arguments from an architecture's params section (without the backbone weights).

    Every key of the section except ``backbone`` and ``train`` is an argument of the builder of
    the same name; the backbone becomes ``backbone`` (arch) and ``trainable_backbone_layers``.
    These are the ``model_args`` stored in the checkpoint: the backbone's weights travel in the
    state dict, so the backbone checkpoint path is not needed to rebuild the model.

    Raises:
        ConfigError: a key of the section is not an argument of the builder.
    """
    from components.models import get_model_builder

    builder = get_model_builder("detection", arch)
    accepted = set(inspect.signature(builder).parameters)
    args = {k: v for k, v in acfg.model_dump(mode="python").items() if k not in _BACKBONE_KEYS}
    args.update(
        num_classes=num_classes,
        backbone=acfg.backbone.arch,
        trainable_backbone_layers=acfg.backbone.trainable_layers,
    )
    unknown = sorted(set(args) - accepted)
    if unknown:
        raise ConfigError(
            f"detector {arch!r} has no argument(s) {unknown}",
            record=f"detect.{arch}",
            fix=f"remove them from params or add them to the builder; it accepts {sorted(accepted)}",
        )
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()}


def build_detector(arch: str, acfg: DetectorConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``arch`` from its params section, starting from ``acfg.backbone.weights``; returns ``(model, model_args)``."""
    from components.models import get_model

    args = detector_arguments(arch, acfg, num_classes)
    model = get_model("detection", arch, weights_backbone=acfg.backbone.weights, **args)
    return model, args


# --------------------------------------------------------------------------- training and evaluation


def detection_step(
    model: nn.Module, batch: tuple[list[Tensor], list[dict[str, Any]]], device: torch.device
) -> dict[str, Tensor]:
    """One training step of any detector: the sum of its loss dict (each term also logged on its own)."""
    images, targets = batch
    images = [img.as_subclass(Tensor).to(device, non_blocking=True) for img in images]
    losses = model(images, plain_targets(targets, device))
    return {"loss": sum(losses.values()), **losses}


@torch.no_grad()
def predict_and_score(
    model: nn.Module,
    loader: Iterable[tuple[list[Tensor], list[dict[str, Any]]]],
    device: torch.device,
    *,
    categories: list[str],
) -> tuple[Any, float, int]:
    """Run ``model`` over ``loader``, feeding a :class:`DetectionEvaluator`; returns ``(evaluator, seconds, images)``.

    The seconds are the model's forward passes only (data loading excluded, CUDA synchronised).
    """
    from components.engine import progress, synchronize
    from components.metrics.detection import DetectionEvaluator

    evaluator = DetectionEvaluator(categories, iou_type="bbox")
    model.eval()
    seconds, n_images = 0.0, 0
    for images, targets in progress(loader, desc="evaluating", leave=False):
        images = [img.as_subclass(Tensor).to(device, non_blocking=True) for img in images]
        synchronize(device)
        start = time.perf_counter()
        detections = model(images)
        synchronize(device)
        seconds += time.perf_counter() - start
        n_images += len(images)
        evaluator.update(
            [{k: v.detach().cpu() for k, v in d.items()} for d in detections], plain_targets(targets)
        )
    return evaluator, seconds, n_images


def evaluate_detector(
    model: nn.Module, loader: Iterable[Any], device: torch.device, *, categories: list[str]
) -> dict[str, float]:
    """The engine's per-epoch validation: COCO's 12 numbers and VOC mAP@0.5 (flat floats).

    No timing: these numbers go into the checkpoints, which must not vary from run to run (the
    test split's ``ms_per_image`` goes to the metrics file).
    """
    evaluator, _, _ = predict_and_score(model, loader, device, categories=categories)
    bbox = evaluator.compute()["bbox"]
    out = {k: float(bbox[k]) for k in COCO_NAMES}
    out["voc_map_50"] = float(bbox["voc"]["map_50"])
    return out


# --------------------------------------------------------------------------- the stage


def run_detect(
    cfg: DetectConfig,
    arch: str,
    augment: AugmentConfig,
    evaluate: EvaluateConfig,
    tracking: TrackingConfig,
    *,
    resume: bool = False,
    context: RunContext | None = None,
) -> dict:
    """Train ``arch`` on ``cfg.dataset``, evaluate it on the test split, write its outputs and MLflow run.

    Args:
        cfg: the ``detect`` params section; ``cfg.<arch>`` holds the architecture's settings.
        arch: one of ``cfg.architectures``' names (``sliding_window``, ``overfeat``, ``yolo``,
            ``ssd``, ``faster_rcnn``, ``retinanet``, ``rcnn``, ``fast_rcnn``).
        augment: the augmentation presets (``augment.detection`` for the train split).
        evaluate: evaluation settings (PR-curve IoU thresholds).
        tracking: where MLflow runs go.
        resume: continue an interrupted run from ``outputs/detect/<arch>/last.pt``, in the MLflow
            run recorded by ``.visionflow/stages/detect@<arch>.json``; without it the stage starts afresh.

    Returns:
        The metrics written to ``metrics/detect/<arch>.json``; ``{"arch", "status": "skipped",
        "reason"}`` when the dataset has no boxes.

    Raises:
        ConfigError: unknown architecture or a params key its builder lacks. DataError: no
        dataset, or a split is missing. CheckpointError: the backbone weights cannot be loaded.
        TrainingError: training diverged.
    """
    from components.engine import torch_threads

    acfg = cfg.arch(arch)
    with torch_threads(acfg.train.threads):
        return _run_detect(cfg, arch, augment, evaluate, tracking, resume=resume, context=context)


def _run_detect(
    cfg: DetectConfig, arch: str, augment: AugmentConfig, evaluate: EvaluateConfig, tracking: TrackingConfig, *, resume: bool,
    context: RunContext | None = None,
) -> dict:
    from components.data.datasets import detection_collate, load_manifest
    from components.engine import build_loader, dataset_record, fit, seed_everything

    acfg = cfg.arch(arch)
    root = Path(cfg.dataset)
    out_dir = Path(cfg.out) / arch
    stage = f"detect@{arch}"
    reason = detection_skip_reason(root, load_manifest(root))
    if reason is not None:
        return skip_stage(stage, arch, out_dir, stage_metrics_path("detect", arch), reason)
    categories: list[str] = list(read_detection_manifest(root)["categories"])
    augment = detector_augment(augment, acfg)
    seed_everything(acfg.train.seed)

    model, model_args = build_detector(arch, acfg, len(categories))
    datasets = detection_datasets(root, augment, acfg.image_size)
    eval_batch = max(acfg.train.batch_size, 8)
    loaders = {
        split: build_loader(datasets[split], acfg.train, train=split == "train", collate_fn=detection_collate, batch_size=None if split == "train" else eval_batch)
        for split in ("train", "val", "test")
    }
    dataset = dataset_record(root)
    params = {"arch": arch, "dataset": str(root), **acfg.model_dump(mode="json"), "augment": augment.model_dump(mode="json")}
    tags = {"stage": "detect", "arch": arch, "task": "detection"}
    with training_run(
        tracking, context=context, stage=stage, out_dir=out_dir, run_name=f"detect-{arch}", tags=tags, resume=resume, params=params, section=acfg, dataset=root
    ) as run:
        meta = {
            "task": "detection",
            "model_name": arch,
            "model_args": model_args,
            "categories": categories,
            "image_size": acfg.image_size,
            "dataset": dataset,
            "backbone_weights": acfg.backbone.weights,
        }
        result = fit(
            model, train_loader=loaders["train"], val_loader=loaders["val"], step=detection_step,
            evaluate=partial(evaluate_detector, categories=categories), cfg=acfg.train, out_dir=out_dir, meta=meta,
            resume=resume, log_metrics=run.logger.log_metrics, desc=f"detect {arch}", state_file=run.state_file,
        )
        if (worker := worker_result()) is not None:
            return worker
        model, best_path, device = reload_best(result, acfg.train.device)
        evaluator, seconds, n_images = predict_and_score(model, loaders["test"], device, categories=categories)
        test = _test_metrics(evaluator, seconds, n_images)
        log_line(
            f"detect {arch}: test split, {n_images} images: mAP@0.5 {test['map_50']:.4f}, "
            f"mAP {test['map']:.4f}, {test['ms_per_image']:.1f} ms/image"
        )
        metrics: dict[str, Any] = {
            "arch": arch,
            "status": "finished",
            "dataset": str(root),
            "dataset_md5": dataset["md5"],
            "backbone": acfg.backbone.model_dump(mode="json"),
            "test": test,
            **fit_summary(result, model, device=device, eval_batch=eval_batch, checkpoint=best_path, run_id=run.run_id),
        }
        if hasattr(model, "windows_per_image"):
            metrics["windows_per_image"] = int(model.windows_per_image)
        _write_outputs(arch, root, model, evaluator, datasets["test"], device, categories, metrics, result, run, evaluate)
    return metrics


def _test_metrics(evaluator: Any, seconds: float, n_images: int) -> dict[str, Any]:
    """The test split's COCO numbers, VOC AP@0.5 (all-point and 11-point), per class, ms per image."""
    bbox = evaluator.compute()["bbox"]
    test: dict[str, Any] = {k: float(bbox[k]) for k in COCO_NAMES}
    test.update(
        voc_map_50=float(bbox["voc"]["map_50"]),
        voc_map_50_11point=float(bbox["voc"]["map_50_11point"]),
        per_class=bbox["per_class"],
        ms_per_image=1000.0 * seconds / max(1, n_images),
        num_images=n_images,
    )
    return test


def _write_outputs(
    arch: str, root: Path, model: nn.Module, evaluator: Any, test_set: Any, device: torch.device, categories: list[str],
    metrics: dict[str, Any], result: Any, run: Any, evaluate: EvaluateConfig,
) -> None:
    """Predictions, PR curves (CSV + PNG), drawn detections, the metrics file; all logged to the run."""
    from components.plots import plot_pr_curves, write_dvc_pr_curves

    out_dir, test, logger = run.out_dir, metrics["test"], run.logger
    curves = evaluator.pr_curves(evaluate.pr_iou_thresholds)
    _, results = evaluator.to_coco()
    predictions = write_json(results, out_dir / "predictions_test.json")
    pr_csvs = write_dvc_pr_curves(curves, out_dir)
    pr_png = plot_pr_curves(curves, out_dir / "pr_curves.png", title=f"{arch} on {root.name} test")
    drawn = draw_detections(
        model, test_set, device, categories=categories, path=out_dir / "detections.png",
        title=f"{arch}: mAP@0.5 {test['map_50']:.3f} on {root.name} test (white: truth)",
    )
    metrics_path = write_json(metrics, stage_metrics_path("detect", arch))
    scalars = {"test": {k: v for k, v in test.items() if k != "per_class"}, "parameters": metrics["parameters"], "train_time_s": result.train_time_s}
    if "windows_per_image" in metrics:
        scalars["windows_per_image"] = metrics["windows_per_image"]
    logger.log_metrics(scalars, sep="_")
    logger.log_artifact(metrics_path)
    logger.log_artifact(predictions, artifact_path="predictions")
    for plot in (drawn, pr_png, *pr_csvs):
        logger.log_artifact(plot, artifact_path="plots")


COMPARED = ("map_50", "map", "voc_map_50", "ms_per_image")


def compare_detectors(cfg: DetectConfig) -> dict:
    """Gather ``metrics/detect/<arch>.json`` of the listed architectures into one table and a PNG.

    Writes ``metrics/detect_comparison.json`` (``{"architectures": {arch: {map_50, map, voc_map_50,
    ms_per_image, parameters, train_time_s, kind}}, "skipped": {arch: reason}, "missing": [...]}``)
    and ``outputs/detect/comparison.png`` (mAP@0.5, mAP@[.5:.95], ms/image, parameters, train
    time): the lecture's takeaway (one-stage detectors faster, two-stage ones more accurate),
    measured. Architectures the data could not feed (``"status": "skipped"``) are listed with
    their reason; when every one was skipped, the table is empty and the PNG lists the reasons.

    Raises:
        DataError: no architecture has run (or been skipped) yet, or a metrics file is not the stage's.
    """
    from components.plots import plot_skipped

    table: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    missing = []
    for arch in cfg.architectures:
        path = stage_metrics_path("detect", arch)
        if not path.is_file():
            missing.append(arch)
            continue
        try:
            metrics = json.loads(path.read_text())
            if metrics.get("status") == "skipped":
                skipped[arch] = str(metrics.get("reason") or "skipped")
                continue
            test = metrics["test"]
            row = {k: test[k] for k in COMPARED}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise DataError(
                "not a detect stage metrics file (no 'test' section)",
                file=path,
                fix=f"re-run `visionflow detect --arch {arch}`",
            ) from None
        row.update(
            parameters=metrics.get("parameters"),
            train_time_s=metrics.get("train_time_s"),
            kind=DETECTOR_KIND.get(arch, "other"),
        )
        if "windows_per_image" in metrics:
            row["windows_per_image"] = metrics["windows_per_image"]
        table[arch] = row
    if not table and not skipped:
        raise DataError(
            f"no detection metrics yet for {list(cfg.architectures)}",
            file=METRICS_DIR,
            fix="run `visionflow detect --arch A` for each architecture first",
        )
    result = {"architectures": table, "skipped": skipped, "missing": missing, "dataset": cfg.dataset}
    write_json(result, Path(METRICS_DIR) / "detect_comparison.json")
    if table:
        plot_detector_comparison(table, Path(cfg.out) / "comparison.png", skipped=skipped)
    else:
        plot_skipped(skipped, Path(cfg.out) / "comparison.png", title="detection: no architecture could run on this dataset")
    return result


DETECTOR_KIND = {
    "sliding_window": "window classifier",
    "overfeat": "window classifier",
    "yolo": "one-stage",
    "ssd": "one-stage",
    "retinanet": "one-stage",
    "faster_rcnn": "two-stage",
    "rcnn": "two-stage",
    "fast_rcnn": "two-stage",
}
