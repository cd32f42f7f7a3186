"""The ``segment`` stage: train and evaluate one segmentation architecture (FCN, UNet, Mask R-CNN).

``visionflow segment --arch A`` calls :func:`run_segment`; ``visionflow segment --compare`` calls
:func:`compare_segmenters`. The stage reads its params section and the canonical dataset, and writes

* ``<segment.out>/<arch>/`` (``outputs/segment/<arch>/``): ``best.pt`` / ``last.pt`` (through the
  engine), ``overlays.png`` (true and predicted masks drawn on test images with ``draw_segmentation_masks``);
* ``metrics/segment/<arch>.json``: per-class IoU, ``miou``, ``pixel_accuracy``, ``fw_iou`` on the test
  split, milliseconds per image, parameters, train time, the MLflow run id; for Mask R-CNN also the
  COCO ``segm`` and ``bbox`` metrics, its semantic numbers coming from its instance masks rendered
  as a semantic map;
* one MLflow run per architecture (params, per-epoch metrics, test metrics, the JSON and the PNGs);
  its id is kept in ``.visionflow/stages/segment@<arch>.json``, from which ``--resume`` re-opens it.

The out folder is a function of code, data and params (byte-identical when the stage runs again).
A dataset without the masks an architecture needs (boxes-only VOC, or binary masks for Mask R-CNN)
*skips* the stage: ``metrics/segment/<arch>.json`` = ``{"arch", "status": "skipped", "reason"}``,
an out folder holding only ``SKIPPED.txt``, exit 0.

Semantic models (FCN, UNet) minimise the pixel-wise cross-entropy over K + 1 classes, ignoring
``ignore_index`` pixels, on images augmented by the ``augment.segmentation`` preset. Mask R-CNN is
trained on the instance view with the ``augment.detection`` preset (which keeps boxes, labels and
masks consistent and drops instances pushed out of the image) and minimises torchvision's sum of RPN, box and mask losses. All
three are validated every epoch on the same quantity, the mean IoU of a semantic map on the
validation split, and compared on the same ground truth: the dataset's semantic masks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.config import (
    METRICS_DIR,
    AugmentConfig,
    MaskRCNNConfig,
    SegmentConfig,
    TrackingConfig,
    stage_metrics_path,
)
from components.engine import log_line, synchronize
from components.errors import ConfigError, DataError
from components.io import write_json
from components.stages.runner import fit_summary, reload_best, skip_stage, training_run, worker_result

SEMANTIC_ARCHS = ("fcn", "unet")
INSTANCE_ARCHS = ("mask_rcnn",)

if TYPE_CHECKING:
    from components.tracking import RunContext


# --------------------------------------------------------------------------- dataset


def segmentation_skip_reason(root: Path, manifest: Mapping[str, Any], *, arch: str) -> str | None:
    """Why ``arch`` cannot train on this dataset (no masks, or no instance masks for Mask R-CNN), or None."""
    from components.stages.detect import describe_labels

    tasks = manifest.get("tasks", [])
    labels = describe_labels(manifest)
    if "semantic_segmentation" not in tasks:
        return f"{root} has no segmentation masks ({labels})"
    if arch in INSTANCE_ARCHS and "instance_segmentation" not in tasks:
        return f"{root} has no instance masks ({labels}); {arch} needs them, fcn and unet do not"
    return None


def read_manifest(root: Path, *, arch: str) -> dict[str, Any]:
    """The canonical dataset's ``dataset.json``, checked for the views ``arch`` needs.

    Raises:
        DataError: no manifest, or the dataset lacks semantic masks (or instance masks for Mask R-CNN).
    """
    from components.data.datasets import load_manifest, require_splits

    manifest = load_manifest(root)
    manifest_path = root / "dataset.json"
    tasks = manifest.get("tasks", [])
    needed = ["semantic_segmentation"] + (["instance_segmentation"] if arch in INSTANCE_ARCHS else [])
    missing = [t for t in needed if t not in tasks]
    if missing:
        raise DataError(
            f"the dataset has no {' / '.join(missing)} view (tasks: {tasks}); {arch} needs it",
            file=manifest_path,
            record="tasks",
            fix="ingest a source with masks (shapes, coco with segmentation, masks:DIR)"
            + (
                "; Mask R-CNN needs instance masks: use fcn or unet for binary mask sources"
                if arch in INSTANCE_ARCHS
                else ""
            ),
        )
    require_splits(manifest, manifest_path)
    return manifest


def semantic_datasets(root: Path, augment: AugmentConfig, image_size: int) -> dict[str, Any]:
    """``SegmentationDataset`` per split: the train split with the augmentation preset, val/test without."""
    from components.augment import build_transforms
    from components.data.datasets import SegmentationDataset

    return {
        split: SegmentationDataset(
            root,
            split,
            transforms=build_transforms(
                "segmentation", augment, train=split == "train", image_size=image_size
            ),
        )
        for split in ("train", "val", "test")
    }


def instance_dataset(root: Path, split: str, augment: AugmentConfig, image_size: int, *, train: bool) -> Any:
    """``DetectionDataset(masks=True)``: images with boxes, labels and instance masks moved together.

    The detection preset (``augment.detection``) is used: it clamps boxes and drops the instances an
    augmentation pushed out of the image, with their labels and masks (``SanitizeBoundingBoxes``).
    """
    from components.augment import build_transforms
    from components.data.datasets import DetectionDataset

    return DetectionDataset(
        root,
        split,
        transforms=build_transforms("detection", augment, train=train, image_size=image_size),
        masks=True,
    )


def semantic_collate(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``[(Image[3, H, W], Mask[H, W])] -> (Tensor[N, 3, H, W] float, Tensor[N, H, W] int64)`` as plain tensors."""
    images = torch.stack([torch.as_tensor(img).as_subclass(Tensor) for img, _ in batch])
    masks = torch.stack([torch.as_tensor(m).as_subclass(Tensor) for _, m in batch]).long()
    return images, masks


# --------------------------------------------------------------------------- models


def pixel_class_frequencies(dataset: Any, num_classes: int) -> list[float]:
    """Pixel frequency of each class in ``dataset``'s masks as stored (no augmentation), ``ignore_index`` left out.

    UNet's head bias starts at the log of these (prior initialisation). Every class gets at least
    one pixel's worth, so that a class absent from the split has a finite log-prior.

    Args:
        dataset: a ``SegmentationDataset`` (its ``root``, ``split`` and ``files`` are read).
        num_classes: K + 1.

    Returns:
        ``num_classes`` frequencies summing to 1.
    """
    from components.data.datasets import read_mask

    counts = torch.ones(num_classes, dtype=torch.float64)
    for name in dataset.files:
        mask = read_mask(dataset.root / "masks" / dataset.split / f"{Path(name).stem}.png").flatten()
        counts += torch.bincount(mask[mask < num_classes], minlength=num_classes).double()
    return (counts / counts.sum()).tolist()


def build_segmenter(
    arch: str, acfg: Any, num_classes: int, *, class_prior: list[float] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``arch`` from its params section; returns ``(model, model_args)``.

    ``model_args`` rebuild the same architecture from the checkpoint alone (``engine.load_model``):
    the backbone's weights travel in the state dict, so the backbone checkpoint path is not kept.
    ``class_prior`` (UNet only: pixel class frequencies, see :func:`pixel_class_frequencies`) only
    initialises the head's bias, so it is not part of ``model_args`` either.
    """
    from components.models import get_model

    backbone = {"backbone_arch": acfg.backbone.arch, "trainable_layers": acfg.backbone.trainable_layers}
    if arch == "fcn":
        args: dict[str, Any] = {
            **backbone,
            "skips": acfg.skips,
            "head_channels": acfg.head_channels,
            "dropout": acfg.dropout,
        }
    elif arch == "unet":
        args = {
            "base_channels": acfg.base_channels,
            "depth": acfg.depth,
            "pretrained_encoder": acfg.pretrained_encoder,
            "deep_supervision": acfg.aux_weight > 0,
        }
        if acfg.pretrained_encoder:
            args.update(backbone)
    elif arch == "mask_rcnn":
        args = {**backbone, "image_size": acfg.image_size, "score_threshold": acfg.score_threshold}
    else:
        raise ConfigError(
            f"unknown segmenter {arch!r}",
            record="segment.architectures",
            fix=f"use one of {SEMANTIC_ARCHS + INSTANCE_ARCHS}",
        )
    args["num_classes"] = num_classes
    uses_backbone = arch != "unet" or acfg.pretrained_encoder
    weights = acfg.backbone.weights if uses_backbone else None
    init = {"class_prior": class_prior} if arch == "unet" and class_prior is not None else {}
    model = get_model("segmentation", arch, backbone_weights=weights, **args, **init)
    return model, args


def backbone_param_groups(model: nn.Module, backbone_lr_mult: float) -> list[dict[str, Any]] | None:
    """Optimiser groups giving the pretrained backbone ``backbone_lr_mult`` x the learning rate of the new layers.

    The fine-tuning recipe: with AdamW every parameter moves by about ``lr`` per step whatever its
    gradient's size, so while the new layers are still random (UNet's whole expanding path, Mask
    R-CNN's FPN and heads) their noisy gradients would push the ImageNet features around at full
    ``lr``. ``model.backbone`` is FCN's and UNet's encoder, ``model.backbone.body`` Mask R-CNN's
    (its FPN is new).

    Returns:
        ``[{"params": backbone, "lr_mult": m, "name": "backbone"}, {"params": rest, "name": "head"}]``
        for :func:`components.engine.fit`, or None (one group) when ``backbone_lr_mult == 1`` or the
        model has no backbone (the classic UNet).
    """
    backbone = getattr(model, "backbone", None)
    if backbone_lr_mult == 1.0 or not isinstance(backbone, nn.Module):
        return None
    backbone = getattr(backbone, "body", backbone)
    in_backbone = {id(p) for p in backbone.parameters()}
    pretrained = [p for p in backbone.parameters() if p.requires_grad]
    new = [p for p in model.parameters() if p.requires_grad and id(p) not in in_backbone]
    groups = [{"params": new, "name": "head"}]
    if pretrained:
        groups.insert(0, {"params": pretrained, "lr_mult": backbone_lr_mult, "name": "backbone"})
    return groups


# --------------------------------------------------------------------------- training steps


def semantic_step(
    model: nn.Module, batch: tuple[Tensor, Tensor], device: torch.device, *, ignore_index: int, aux_weight: float = 0.0
) -> dict[str, Tensor]:
    """Pixel-wise cross-entropy of the logits ``[N, K+1, H, W]`` against the masks ``[N, H, W]`` (``ignore_index`` skipped).

    A model with deep supervision returns ``{"out", "aux"}`` in training: the loss is then
    ``CE(out) + aux_weight * CE(aux)``, with both terms also reported on their own.
    """
    images, masks = batch
    masks = masks.to(device, non_blocking=True)
    output = model(images.to(device, non_blocking=True))
    if not isinstance(output, dict):
        return {"loss": F.cross_entropy(output.float(), masks, ignore_index=ignore_index)}
    main = F.cross_entropy(output["out"].float(), masks, ignore_index=ignore_index)
    aux = F.cross_entropy(output["aux"].float(), masks, ignore_index=ignore_index)
    return {"loss": main + aux_weight * aux, "loss_out": main, "loss_aux": aux}


def instance_step(
    model: nn.Module, batch: tuple[list[Tensor], list[dict[str, Any]]], device: torch.device
) -> dict[str, Tensor]:
    """Mask R-CNN: the sum of torchvision's RPN, box and mask losses (each also logged on its own)."""
    images, targets = batch
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()}
        for t in targets
    ]
    losses = model(images, targets)
    return {"loss": sum(losses.values()), **losses}


# --------------------------------------------------------------------------- prediction as a semantic map


def render_semantic_map(
    detections: Mapping[str, Tensor], size: tuple[int, int], *, score_threshold: float, mask_threshold: float
) -> Tensor:
    """Paint Mask R-CNN's instance masks into one class-index map, so it is scored like FCN and UNet.

    Instances with ``score >= score_threshold`` are painted in increasing score order (the most
    confident instance wins where masks overlap); a pixel belongs to an instance where its mask
    probability is ``>= mask_threshold``.

    Args:
        detections: ``{"masks": Tensor[N, 1, H, W] probabilities, "labels": Tensor[N] 1..K, "scores": Tensor[N]}``.
        size: ``(H, W)``.

    Returns:
        Tensor[H, W] int64: 0 background, k for category k.
    """
    semantic = torch.zeros(size, dtype=torch.int64)
    scores = detections["scores"].detach().cpu()
    keep = (scores >= score_threshold).nonzero().flatten()
    for i in keep[scores[keep].argsort()].tolist():
        semantic[detections["masks"][i, 0].detach().cpu() >= mask_threshold] = int(detections["labels"][i])
    return semantic


def predict_semantic(model: nn.Module, images: Tensor, *, instance: dict[str, float] | None = None) -> Tensor:
    """Class-index maps ``Tensor[N, H, W]`` for ``images [N, 3, H, W]``: argmax of the logits, or rendered instances."""
    if instance is None:
        return model(images).argmax(dim=1)
    detections = model(list(images))
    return torch.stack([render_semantic_map(d, tuple(images.shape[-2:]), **instance) for d in detections])


@torch.no_grad()
def evaluate_semantic(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    *,
    num_classes: int,
    ignore_index: int,
    class_names: list[str] | None = None,
    instance: dict[str, float] | None = None,
    timed: bool = True,
) -> dict[str, Any]:
    """Confusion-matrix metrics (per-class IoU, ``miou``, ``pixel_accuracy``, ``fw_iou``) and ``ms_per_image``.

    Args:
        model: a semantic model (logits) or, with ``instance``, Mask R-CNN (rendered with
            :func:`render_semantic_map`, ``instance`` holding its thresholds).
        loader: batches ``(Tensor[N, 3, H, W], Tensor[N, H, W])``.
        num_classes: K + 1.
        timed: add ``ms_per_image``; False for the per-epoch validation, whose numbers go into the
            checkpoints (which must not vary from run to run).
    """
    from components.engine import progress
    from components.metrics.segmentation import SegmentationEvaluator

    evaluator = SegmentationEvaluator(
        num_classes=num_classes, ignore_index=ignore_index, class_names=class_names
    )
    model.eval()
    seconds, n_images = 0.0, 0
    for images, masks in progress(loader, desc="evaluating", leave=False):
        images = images.to(device, non_blocking=True)
        synchronize(device)
        start = time.perf_counter()
        preds = predict_semantic(model, images, instance=instance)
        synchronize(device)
        seconds += time.perf_counter() - start
        n_images += images.shape[0]
        evaluator.update(preds.cpu(), masks)
    metrics = dict(evaluator.compute())
    if timed:
        metrics["ms_per_image"] = 1000.0 * seconds / max(1, n_images)
    return metrics


@torch.no_grad()
def evaluate_instances(
    model: nn.Module,
    loader: Iterable[tuple[list[Tensor], list[dict[str, Any]]]],
    device: torch.device,
    *,
    categories: list[str],
    mask_threshold: float,
) -> dict[str, Any]:
    """COCO ``segm`` and ``bbox`` metrics (12 numbers each, per class, VOC AP@0.5) of Mask R-CNN on ``loader``."""
    from components.metrics.detection import DetectionEvaluator

    evaluators = {
        t: DetectionEvaluator(categories, iou_type=t, mask_threshold=mask_threshold) for t in ("segm", "bbox")
    }
    model.eval()
    for images, targets in loader:
        detections = model([img.to(device, non_blocking=True) for img in images])
        detections = [{k: v.detach().cpu() for k, v in d.items()} for d in detections]
        for evaluator in evaluators.values():
            evaluator.update(detections, targets)
    return {t: ev.compute()[t] for t, ev in evaluators.items()}


# --------------------------------------------------------------------------- outputs


@torch.no_grad()
def draw_test_overlays(
    model: nn.Module,
    dataset: Any,
    device: torch.device,
    *,
    count: int,
    class_names: list[str],
    path: Path,
    ignore_index: int,
    instance: dict[str, float] | None = None,
    title: str = "",
) -> Path:
    """Overlay true and predicted masks on the first ``count`` test images (``draw_segmentation_masks``) as one PNG."""
    from components.plots import plot_segmentation_overlays

    model.eval()
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    images, masks = semantic_collate(samples)
    preds = torch.cat(
        [
            predict_semantic(model, images[i : i + 8].to(device), instance=instance).cpu()
            for i in range(0, len(images), 8)
        ]
    )
    return plot_segmentation_overlays(
        images, masks, preds, class_names, path, ignore_index=ignore_index, title=title
    )



# --------------------------------------------------------------------------- the stage


def run_segment(
    cfg: SegmentConfig, arch: str, augment: AugmentConfig, tracking: TrackingConfig, *, resume: bool = False, context: RunContext | None = None
) -> dict:
    """Train ``arch`` on ``cfg.dataset``, evaluate it on the test split, write its outputs and MLflow run.

    The whole stage (data preparation, training, test evaluation) runs with the architecture's
    ``train.threads`` CPU threads.

    Args:
        cfg: the ``segment`` params section.
        arch: ``"fcn"``, ``"unet"`` or ``"mask_rcnn"``.
        augment: the augmentation presets (``augment.segmentation`` for FCN/UNet, ``augment.detection``
            for Mask R-CNN; the train split only).
        tracking: where MLflow runs go.
        resume: continue an interrupted run from ``outputs/segment/<arch>/last.pt``, in the MLflow
            run recorded by ``.visionflow/stages/segment@<arch>.json``; without it the stage starts afresh.

    Returns:
        What is written to ``metrics/segment/<arch>.json``: ``{"arch", "status": "finished", "dataset",
        "test": {miou, pixel_accuracy, mean_accuracy, fw_iou, per_class_iou, ms_per_image, num_images,
        [segm, bbox]}, "val" (best epoch), "parameters", "train_time_s", "train_cpu_time_s", "epochs",
        "best_epoch", "checkpoint", "run_id", ...}``; or ``{"arch", "status": "skipped", "reason"}``
        when the dataset lacks the masks ``arch`` needs.

    Raises:
        ConfigError: unknown architecture. DataError: no dataset, or a split is missing.
        CheckpointError: the backbone weights cannot be loaded. TrainingError: training diverged.
    """
    acfg = cfg.arch(arch)
    from components.engine import torch_threads

    with torch_threads(acfg.train.threads):
        return _run_segment(cfg, arch, augment, tracking, resume=resume, context=context)


def _run_segment(
    cfg: SegmentConfig, arch: str, augment: AugmentConfig, tracking: TrackingConfig, *, resume: bool, context: RunContext | None = None
) -> dict:
    from components.data.datasets import load_manifest
    from components.engine import dataset_record, fit, seed_everything

    acfg = cfg.arch(arch)
    root = Path(cfg.dataset)
    out_dir = Path(cfg.out) / arch
    stage = f"segment@{arch}"
    reason = segmentation_skip_reason(root, load_manifest(root), arch=arch)
    if reason is not None:
        return skip_stage(stage, arch, out_dir, stage_metrics_path("segment", arch), reason)
    categories: list[str] = list(read_manifest(root, arch=arch)["categories"])
    class_names = ["background", *categories]
    seed_everything(acfg.train.seed)
    setup = _setup(cfg, arch, augment, root, class_names)
    dataset = dataset_record(root)
    is_instance = arch in INSTANCE_ARCHS
    params = {"arch": arch, "dataset": str(root), "ignore_index": cfg.ignore_index, **acfg.model_dump(mode="json"), "augment": augment.model_dump(mode="json")}
    tags = {"stage": "segment", "arch": arch}
    with training_run(
        tracking, context=context, stage=stage, out_dir=out_dir, run_name=f"segment-{arch}", tags=tags, resume=resume, params=params, section=acfg, dataset=root
    ) as run:
        meta = {
            "task": "segmentation",
            "model_name": arch,
            "model_args": setup["model_args"],
            "categories": categories,
            "image_size": acfg.image_size,
            "dataset": dataset,
            "segmentation": "instance" if is_instance else "semantic",
        }
        if is_instance:
            meta.update(score_threshold=acfg.semantic_score_threshold, mask_threshold=acfg.mask_threshold)
        model = setup["model"]
        result = fit(
            model, train_loader=setup["train"], val_loader=setup["val"], step=setup["step"], evaluate=setup["evaluate"], cfg=acfg.train,
            out_dir=out_dir, meta=meta, param_groups=backbone_param_groups(model, acfg.backbone_lr_mult), resume=resume,
            log_metrics=run.logger.log_metrics, desc=f"segment {arch}", state_file=run.state_file,
        )
        if (worker := worker_result()) is not None:
            return worker
        model, best_path, device = reload_best(result, acfg.train.device)
        test = _test_metrics(cfg, arch, augment, root, model, device, setup, categories, class_names)
        n_test = len(setup["semantic"]["test"])
        log_line(
            f"segment {arch}: test split, {n_test} images: mIoU {test['miou']:.4f}, "
            f"pixel accuracy {test['pixel_accuracy']:.4f}, {test['ms_per_image']:.1f} ms/image"
        )
        metrics: dict[str, Any] = {
            "arch": arch,
            "status": "finished",
            "dataset": str(root),
            "dataset_md5": dataset["md5"],
            "test": {"num_images": n_test, **test},
            **fit_summary(result, model, device=device, eval_batch=setup["eval_batch"], checkpoint=best_path, run_id=run.run_id),
        }
        overlays = draw_test_overlays(
            model, setup["semantic"]["test"], device, count=cfg.overlays, class_names=class_names, path=out_dir / "overlays.png",
            ignore_index=cfg.ignore_index, instance=setup["instance"], title=f"{arch}: mIoU {test['miou']:.3f} on {root.name} test",
        )
        metrics_path = write_json(metrics, stage_metrics_path("segment", arch))
        run.logger.log_metrics({"test": test, "parameters": metrics["parameters"], "train_time_s": result.train_time_s}, sep="_")
        run.logger.log_artifact(metrics_path)
        run.logger.log_artifact(overlays, artifact_path="plots")
    return metrics


def _setup(cfg: SegmentConfig, arch: str, augment: AugmentConfig, root: Path, class_names: list[str]) -> dict[str, Any]:
    """Datasets, loaders, model, training step and validation of ``arch`` (semantic, or Mask R-CNN on the instance view)."""
    from components.data.datasets import detection_collate
    from components.engine import build_loader

    acfg = cfg.arch(arch)
    num_classes = len(class_names)
    semantic = semantic_datasets(root, augment, acfg.image_size)
    prior = pixel_class_frequencies(semantic["train"], num_classes) if arch == "unet" else None
    model, model_args = build_segmenter(arch, acfg, num_classes, class_prior=prior)
    eval_batch = max(acfg.train.batch_size, 8)
    val_loader = build_loader(semantic["val"], acfg.train, train=False, collate_fn=semantic_collate, batch_size=eval_batch)
    test_loader = build_loader(semantic["test"], acfg.train, train=False, collate_fn=semantic_collate, batch_size=eval_batch)
    instance_cfg: dict[str, float] | None = None
    if arch in INSTANCE_ARCHS:
        assert isinstance(acfg, MaskRCNNConfig)
        instance_cfg = {"score_threshold": acfg.semantic_score_threshold, "mask_threshold": acfg.mask_threshold}
        train_set = instance_dataset(root, "train", augment, acfg.image_size, train=True)
        train_loader = build_loader(train_set, acfg.train, train=True, collate_fn=detection_collate)
        step: Any = instance_step
    else:
        train_loader = build_loader(semantic["train"], acfg.train, train=True, collate_fn=semantic_collate)
        step = partial(semantic_step, ignore_index=cfg.ignore_index, aux_weight=getattr(acfg, "aux_weight", 0.0))
    evaluate = partial(
        evaluate_semantic, num_classes=num_classes, ignore_index=cfg.ignore_index, class_names=class_names, instance=instance_cfg, timed=False
    )
    return {
        "semantic": semantic, "model": model, "model_args": model_args, "eval_batch": eval_batch, "train": train_loader,
        "val": val_loader, "test": test_loader, "instance": instance_cfg, "step": step, "evaluate": evaluate,
    }


def _test_metrics(
    cfg: SegmentConfig, arch: str, augment: AugmentConfig, root: Path, model: nn.Module, device: torch.device,
    setup: dict[str, Any], categories: list[str], class_names: list[str],
) -> dict[str, Any]:
    """Semantic metrics on the test split; for Mask R-CNN also COCO ``segm``/``bbox`` on its instance view."""
    from components.data.datasets import detection_collate
    from components.engine import build_loader

    acfg = cfg.arch(arch)
    test = evaluate_semantic(
        model, setup["test"], device, num_classes=len(class_names), ignore_index=cfg.ignore_index, class_names=class_names,
        instance=setup["instance"],
    )
    if arch in INSTANCE_ARCHS:
        test_set = instance_dataset(root, "test", augment, acfg.image_size, train=False)
        coco_loader = build_loader(test_set, acfg.train, train=False, collate_fn=detection_collate, batch_size=setup["eval_batch"])
        test.update(evaluate_instances(model, coco_loader, device, categories=categories, mask_threshold=acfg.mask_threshold))
        test["semantic_from"] = f"instance masks >= {acfg.mask_threshold} with score >= {acfg.semantic_score_threshold}"
    return test


COMPARED = ("miou", "pixel_accuracy", "ms_per_image", "parameters", "train_time_s")


def compare_segmenters(cfg: SegmentConfig) -> dict:
    """Gather ``metrics/segment/<arch>.json`` of the listed architectures into one table and a PNG.

    Writes ``metrics/segment_comparison.json`` (``{"architectures": {arch: {miou, pixel_accuracy,
    ms_per_image, parameters, train_time_s, per_class_iou}}, "skipped": {arch: reason}, "missing":
    [...]}``) and ``outputs/segment/comparison.png``. Architectures the data could not feed
    (``"status": "skipped"``) are listed with their reason, never a failure: on a boxes-only
    dataset every segmenter is skipped and the PNG lists why.

    Raises:
        DataError: no architecture has run (or been skipped) yet, or a metrics file is not the stage's.
    """
    from components.plots import plot_segmenter_comparison

    table: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    missing = []
    for arch in cfg.architectures:
        path = stage_metrics_path("segment", arch)
        if not path.is_file():
            missing.append(arch)
            continue
        try:
            metrics = json.loads(path.read_text())
            if metrics.get("status") == "skipped":
                skipped[arch] = str(metrics.get("reason") or "skipped")
                continue
            test = metrics["test"]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise DataError(
                "not a segment stage metrics file (no 'test' section)",
                file=path,
                fix=f"re-run `visionflow segment --arch {arch}`",
            ) from None
        table[arch] = {k: test.get(k, metrics.get(k)) for k in COMPARED} | {
            "per_class_iou": test.get("per_class_iou", {})
        }
        for iou_type in ("segm", "bbox"):
            if isinstance(test.get(iou_type), Mapping):
                table[arch][f"{iou_type}_map"] = test[iou_type].get("map")
                table[arch][f"{iou_type}_map_50"] = test[iou_type].get("map_50")
    if not table and not skipped:
        raise DataError(
            f"no segmentation metrics yet for {list(cfg.architectures)}",
            file=Path(METRICS_DIR),
            fix="run `visionflow segment --arch A` for each architecture first",
        )
    result = {"architectures": table, "skipped": skipped, "missing": missing, "dataset": cfg.dataset}
    write_json(result, Path(METRICS_DIR) / "segment_comparison.json")
    plot_segmenter_comparison(table, Path(cfg.out) / "comparison.png", skipped=skipped)
    return result
