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
* ``<detect.metrics>/detect_<arch>.json`` (default ``metrics/``): COCO's 12 numbers, VOC AP@0.5 (all-point), per-class AP,
  inference milliseconds per image, parameters, training time (and windows per image for the
  sliding window);
* one MLflow run per architecture with the params, per-epoch metrics, test metrics and files.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from components.config import AugmentConfig, DetectConfig, DetectorConfig, EvaluateConfig, TrackingConfig
from components.errors import ConfigError, DataError
from components.metrics.detection import COCO_METRIC_NAMES as COCO_NAMES

_BACKBONE_KEYS = ("backbone", "train", "augment")  # params keys that are not builder arguments


# --------------------------------------------------------------------------- dataset


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


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- training and evaluation


def detection_step(
    model: nn.Module, batch: tuple[list[Tensor], list[dict[str, Any]]], device: torch.device
) -> dict[str, Tensor]:
    """One training step of any detector: the sum of its loss dict (each term also logged on its own)."""
    images, targets = batch
    images = [img.as_subclass(Tensor).to(device, non_blocking=True) for img in images]
    losses = model(images, plain_targets(targets, device))
    return {"loss": sum(losses.values()), **losses}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    from components.metrics.detection import DetectionEvaluator

    evaluator = DetectionEvaluator(categories, iou_type="bbox")
    model.eval()
    seconds, n_images = 0.0, 0
    for images, targets in loader:
        images = [img.as_subclass(Tensor).to(device, non_blocking=True) for img in images]
        _synchronize(device)
        start = time.perf_counter()
        detections = model(images)
        _synchronize(device)
        seconds += time.perf_counter() - start
        n_images += len(images)
        evaluator.update(
            [{k: v.detach().cpu() for k, v in d.items()} for d in detections], plain_targets(targets)
        )
    return evaluator, seconds, n_images


def evaluate_detector(
    model: nn.Module, loader: Iterable[Any], device: torch.device, *, categories: list[str]
) -> dict[str, float]:
    """The engine's per-epoch validation: COCO's 12 numbers, VOC mAP@0.5 and ms per image (flat floats)."""
    evaluator, seconds, n = predict_and_score(model, loader, device, categories=categories)
    bbox = evaluator.compute()["bbox"]
    out = {k: float(bbox[k]) for k in COCO_NAMES}
    out["voc_map_50"] = float(bbox["voc"]["map_50"])
    out["ms_per_image"] = 1000.0 * seconds / max(1, n)
    return out


# --------------------------------------------------------------------------- outputs


@torch.no_grad()
def draw_detections(
    model: nn.Module,
    dataset: Any,
    device: torch.device,
    *,
    categories: list[str],
    path: Path,
    count: int = 8,
    score_threshold: float = 0.3,
    extra: int = 2,
    title: str = "",
) -> Path:
    """A grid PNG of the first ``count`` test images: true boxes in white, predictions in class colours.

    Drawn per image: every prediction with score >= ``score_threshold``, and at least the
    ``n_true + extra`` highest-scoring ones whatever their score (each box is labelled with its
    score). A fixed threshold alone hides a detector whose scores are calibrated lower (YOLO's
    class-specific confidence ``c * p`` is trained towards the IoU) although its ranking, which is
    what mAP measures, is good.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import draw_bounding_boxes

    model.eval()
    n = min(count, len(dataset))
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.4), squeeze=False)
    palette = plt.get_cmap("tab10")
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        ax.axis("off")
        if i >= n:
            continue
        image, target = dataset[i]
        image = image.as_subclass(Tensor)
        (det,) = model([image.to(device)])
        gt_boxes = target["boxes"].as_subclass(Tensor)
        scores_all = det["scores"].cpu()
        keep = scores_all >= score_threshold
        keep[scores_all.argsort(descending=True)[: len(gt_boxes) + extra]] = True
        pixels = (image.clamp(0, 1) * 255).to(torch.uint8)
        if len(gt_boxes):
            pixels = draw_bounding_boxes(pixels, gt_boxes, colors="white", width=1)
        boxes, labels, scores = det["boxes"].cpu()[keep], det["labels"].cpu()[keep], det["scores"].cpu()[keep]
        if len(boxes):
            names = [f"{categories[int(k) - 1]} {s:.2f}" for k, s in zip(labels, scores, strict=True)]
            colors = [tuple(int(255 * c) for c in palette((int(k) - 1) % 10)[:3]) for k in labels]
            pixels = draw_bounding_boxes(pixels, boxes, labels=names, colors=colors, width=2)
        ax.imshow(pixels.permute(1, 2, 0).numpy())
    fig.suptitle(title or "white: ground truth; coloured: predictions", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path



# --------------------------------------------------------------------------- the stage


def run_detect(
    cfg: DetectConfig,
    arch: str,
    augment: AugmentConfig,
    evaluate: EvaluateConfig,
    tracking: TrackingConfig,
    *,
    resume: bool = False,
) -> dict:
    """Train ``arch`` on ``cfg.dataset``, evaluate it on the test split, write its outputs and MLflow run.

    Args:
        cfg: the ``detect`` params section; ``cfg.<arch>`` holds the architecture's settings.
        arch: one of ``cfg.architectures``' names (``sliding_window``, ``overfeat``, ``yolo``,
            ``ssd``, ``faster_rcnn``, ``retinanet``, ``rcnn``, ``fast_rcnn``).
        augment: the augmentation presets (``augment.detection`` for the train split).
        evaluate: evaluation settings (PR-curve IoU thresholds).
        tracking: where MLflow runs go.
        resume: continue an interrupted run from ``outputs/detect/<arch>/last.pt`` (and its MLflow run).

    Returns:
        The metrics written to ``metrics/detect_<arch>.json``.

    Raises:
        ConfigError: unknown architecture or a params key its builder lacks. DataError: the dataset
        lacks boxes or a split. CheckpointError: the backbone weights cannot be loaded.
        TrainingError: training diverged.
    """
    from components.data.datasets import detection_collate
    from components.engine import (
        build_loader,
        fit,
        load_checkpoint,
        load_model,
        resolve_device,
        seed_everything,
    )
    from components.plots import plot_pr_curves, write_dvc_pr_curves, write_json
    from components.tracking import start_run

    acfg = cfg.arch(arch)
    root = Path(cfg.dataset)
    manifest = read_detection_manifest(root)
    categories: list[str] = list(manifest["categories"])
    out_dir = Path(cfg.out) / arch
    augment = detector_augment(augment, acfg)
    seed_everything(acfg.train.seed)

    model, model_args = build_detector(arch, acfg, len(categories))
    datasets = detection_datasets(root, augment, acfg.image_size)
    eval_batch = max(acfg.train.batch_size, 8)
    train_loader = build_loader(datasets["train"], acfg.train, train=True, collate_fn=detection_collate)
    val_loader = build_loader(
        datasets["val"], acfg.train, train=False, collate_fn=detection_collate, batch_size=eval_batch
    )
    test_loader = build_loader(
        datasets["test"], acfg.train, train=False, collate_fn=detection_collate, batch_size=eval_batch
    )

    run_id = None
    last = out_dir / "last.pt"
    if resume and last.exists():
        run_id = load_checkpoint(last).get("mlflow_run_id")
    with start_run(
        tracking,
        run_name=f"detect-{arch}",
        tags={"stage": "detect", "arch": arch, "task": "detection"},
        run_id=run_id,
    ) as logger:
        if run_id is None:
            logger.log_params(
                {
                    "arch": arch,
                    "dataset": str(root),
                    **acfg.model_dump(mode="json"),
                    "augment": augment.model_dump(mode="json"),
                }
            )
        meta = {
            "task": "detection",
            "model_name": arch,
            "model_args": model_args,
            "categories": categories,
            "image_size": acfg.image_size,
            "dataset": str(root),
            "backbone_weights": acfg.backbone.weights,
            "mlflow_run_id": logger.run_id,
        }
        result = fit(
            model,
            train_loader=train_loader,
            val_loader=val_loader,
            step=detection_step,
            evaluate=partial(evaluate_detector, categories=categories),
            cfg=acfg.train,
            out_dir=out_dir,
            meta=meta,
            resume=resume,
            log_metrics=logger.log_metrics,
            desc=f"detect {arch}",
        )
        from components.distributed import is_main_process, rank

        if not is_main_process():  # torchrun: ranks 1.. trained their shard; rank 0 alone tests and writes files
            return {"rank": rank(), "role": "worker"}

        best_path = result.best_path or result.last_path
        assert best_path is not None
        model, _ = load_model(best_path)
        device = resolve_device(acfg.train.device)
        model.to(device)
        evaluator, seconds, n_images = predict_and_score(model, test_loader, device, categories=categories)
        bbox = evaluator.compute()["bbox"]
        curves = evaluator.pr_curves(evaluate.pr_iou_thresholds)
        _, results = evaluator.to_coco()
        test: dict[str, Any] = {k: float(bbox[k]) for k in COCO_NAMES}
        test.update(
            voc_map_50=float(bbox["voc"]["map_50"]),
            voc_map_50_11point=float(bbox["voc"]["map_50_11point"]),
            per_class=bbox["per_class"],
            ms_per_image=1000.0 * seconds / max(1, n_images),
            num_images=n_images,
        )
        metrics: dict[str, Any] = {
            "arch": arch,
            "dataset": str(root),
            "backbone": acfg.backbone.model_dump(mode="json"),
            "test": test,
            "val": result.best_metrics,
            "parameters": count_parameters(model),
            "train_time_s": result.train_time_s,
            "epochs": result.epochs_completed,
            "best_epoch": result.best_epoch,
            "images_per_s": result.images_per_s,
            "device": device.type,
            "eval_batch_size": eval_batch,
            "checkpoint": str(best_path),
        }
        if hasattr(model, "windows_per_image"):
            metrics["windows_per_image"] = int(model.windows_per_image)
        predictions = write_json(results, out_dir / "predictions_test.json")
        pr_csvs = write_dvc_pr_curves(curves, out_dir)
        pr_png = plot_pr_curves(curves, out_dir / "pr_curves.png", title=f"{arch} on {root.name} test")
        drawn = draw_detections(
            model,
            datasets["test"],
            device,
            categories=categories,
            path=out_dir / "detections.png",
            title=f"{arch}: mAP@0.5 {test['map_50']:.3f} on {root.name} test (white: truth)",
        )
        metrics_path = write_json(metrics, Path(cfg.metrics) / f"detect_{arch}.json")
        scalars = {
            "test": {k: v for k, v in test.items() if k != "per_class"},
            "parameters": metrics["parameters"],
            "train_time_s": result.train_time_s,
        }
        if "windows_per_image" in metrics:
            scalars["windows_per_image"] = metrics["windows_per_image"]
        logger.log_metrics(scalars, sep="_")
        logger.log_artifact(metrics_path)
        logger.log_artifact(predictions, artifact_path="predictions")
        for plot in (drawn, pr_png, *pr_csvs):
            logger.log_artifact(plot, artifact_path="plots")
    return metrics


COMPARED = ("map_50", "map", "voc_map_50", "ms_per_image")


def compare_detectors(cfg: DetectConfig) -> dict:
    """Gather ``metrics/detect_<arch>.json`` of the listed architectures into one table and a PNG.

    Writes ``metrics/detect_comparison.json`` (``{"architectures": {arch: {map_50, map, voc_map_50,
    ms_per_image, parameters, train_time_s, kind}}, "missing": [...]}``) and
    ``outputs/detect/comparison.png`` (mAP@0.5, mAP@[.5:.95], ms/image, parameters, train time):
    the lecture's takeaway (one-stage detectors faster, two-stage ones more accurate), measured.

    Raises:
        DataError: no architecture has been run yet, or a metrics file is not the stage's.
    """
    from components.plots import write_json

    table: dict[str, dict[str, Any]] = {}
    missing = []
    for arch in cfg.architectures:
        path = Path(cfg.metrics) / f"detect_{arch}.json"
        if not path.is_file():
            missing.append(arch)
            continue
        try:
            metrics = json.loads(path.read_text())
            test = metrics["test"]
            row = {k: test[k] for k in COMPARED}
        except (json.JSONDecodeError, KeyError, TypeError):
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
    if not table:
        raise DataError(
            f"no detection metrics yet for {list(cfg.architectures)}",
            file=cfg.metrics,
            fix="run `visionflow detect --arch A` for each architecture first",
        )
    result = {"architectures": table, "missing": missing, "dataset": cfg.dataset}
    write_json(result, Path(cfg.metrics) / "detect_comparison.json")
    plot_detector_comparison(table, Path(cfg.out) / "comparison.png")
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


def plot_detector_comparison(table: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Five bar panels (mAP@0.5, mAP@[.5:.95], ms/image, parameters, train time), bars coloured by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(table)
    colors = {
        "one-stage": "tab:blue",
        "two-stage": "tab:orange",
        "window classifier": "tab:gray",
        "other": "tab:green",
    }
    panels = [
        ("map_50", "mAP@0.5", 1.0),
        ("map", "mAP@[.5:.95]", 1.0),
        ("ms_per_image", "inference ms / image", 1.0),
        ("parameters", "parameters (M)", 1e-6),
        ("train_time_s", "training time (s)", 1.0),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.8))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        values = [float(table[a].get(key) or 0.0) * scale for a in archs]
        ax.bar(
            range(len(archs)),
            values,
            color=[colors.get(table[a].get("kind", "other"), "tab:green") for a in archs],
        )
        ax.set_xticks(range(len(archs)), archs, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), loc="upper right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
