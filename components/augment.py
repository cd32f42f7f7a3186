"""Named ``transforms.v2`` augmentation presets per task, and the augment stage's preview.

Presets (``augment.<task>`` in params; an unknown name raises :class:`ConfigError`):

* classification: ``none`` (resize), ``basic`` (random resized crop + horizontal flip),
  ``strong`` (basic + vertical flip, HSV colour jitter, random erasing).
* detection: ``none``, ``basic`` (horizontal flip), ``yolo``: the YOLO recipe - horizontal flip,
  random scaling and translation (``RandomAffine``), random resized crop, HSV jitter - then boxes
  that leave the image are clipped (``ClampBoundingBoxes``) and those left too small are dropped
  together with their labels, masks, areas and crowd flags (``SanitizeBoundingBoxes``).
* segmentation: ``none``, ``basic`` (random resized crop + flip + HSV jitter, the mask moves with
  the image, nearest-neighbour), ``elastic`` (basic + ``ElasticTransform``, the UNet paper's
  augmentation for the membrane data). Pixels an augmentation invents are 255 (ignore).

Every preset ends at ``image_size x image_size``; ``train=False`` gives the evaluation transform
(a plain resize). The augment stage (:func:`write_preview`) records the policy and seed and draws
a preview grid; it never writes augmented copies (augmentation happens on the fly).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from components.config import AugmentConfig
from components.errors import ConfigError
from components.io import write_json

PRESETS: dict[str, tuple[str, ...]] = {
    "classification": ("none", "basic", "strong"),
    "detection": ("none", "basic", "yolo"),
    "segmentation": ("none", "basic", "elastic"),
}
#: YOLO letterbox grey for image pixels an affine transform invents
FILL_GREY = 114 / 255


def _preset_name(task: str, cfg: AugmentConfig) -> str:
    if task not in PRESETS:
        raise ConfigError(
            f"unknown augmentation task {task!r}", record="augment", fix=f"use one of {list(PRESETS)}"
        )
    name = getattr(cfg, task)
    if name not in PRESETS[task]:
        raise ConfigError(
            f"unknown {task} preset {name!r}",
            record=f"augment.{task}",
            fix=f"use one of {list(PRESETS[task])}",
        )
    return name


def _colour_jitter(cfg: AugmentConfig) -> v2.Transform:
    """HSV jitter as YOLO's hsv_h/hsv_s/hsv_v gains: hue as a fraction of the colour circle."""
    return v2.ColorJitter(brightness=cfg.hsv_v, saturation=cfg.hsv_s, hue=cfg.hsv_h)


def _flips(cfg: AugmentConfig) -> list[v2.Transform]:
    out: list[v2.Transform] = []
    if cfg.hflip > 0:
        out.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        out.append(v2.RandomVerticalFlip(cfg.vflip))
    return out


def _target_fields(inputs: Any) -> tuple[torch.Tensor, ...]:
    """What ``SanitizeBoundingBoxes`` drops together with a box: labels, iscrowd and area of the target dict."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) and len(inputs) > 1 else inputs
    if not isinstance(target, dict):
        return ()
    return tuple(target[k] for k in ("labels", "iscrowd", "area") if isinstance(target.get(k), torch.Tensor))


class RecomputeArea(v2.Transform):
    """Set ``target["area"]`` to what the transformed sample shows: mask pixels, else box area.

    Scaling and cropping change object areas; COCO's small/medium/large ranges read ``area``.
    """

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        target = sample[1] if isinstance(sample, (tuple, list)) and len(sample) > 1 else None
        if isinstance(target, dict) and isinstance(target.get("boxes"), tv_tensors.BoundingBoxes):
            if isinstance(target.get("masks"), tv_tensors.Mask) and target["masks"].ndim == 3:
                target["area"] = target["masks"].flatten(1).sum(1).to(torch.float32)
            else:
                b = target["boxes"].as_subclass(torch.Tensor)
                target["area"] = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).to(torch.float32)
        return sample


def build_transforms(task: str, cfg: AugmentConfig, *, train: bool, image_size: int) -> v2.Compose:
    """The ``transforms.v2`` pipeline of a task's preset (``cfg.<task>``), ending at ``image_size``.

    Args:
        task: ``classification``, ``detection`` or ``segmentation``.
        cfg: the ``augment`` params (preset names and the YOLO recipe's gains).
        train: the training preset; False gives the evaluation transform (a resize).
        image_size: output side in pixels.

    Returns:
        a pipeline called as ``t(image)`` (classification), ``t(image, target)`` (detection,
        target with ``boxes``/``labels``/``masks``) or ``t(image, mask)`` (segmentation).

    Raises:
        ConfigError: unknown task or preset name.
    """
    name = _preset_name(task, cfg)
    size = (image_size, image_size)
    resize = v2.Resize(size, antialias=True)
    if not train or name == "none":
        steps: list[v2.Transform] = [resize]
        if task == "detection":
            steps += [
                v2.ClampBoundingBoxes(),
                v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_target_fields),
                RecomputeArea(),
            ]
        return v2.Compose(steps)
    crop = v2.RandomResizedCrop(size, scale=cfg.crop_scale, antialias=True)
    if task == "classification":
        steps = [crop, *([v2.RandomHorizontalFlip(cfg.hflip)] if cfg.hflip > 0 else [])]
        if name == "strong":
            steps += [
                *([v2.RandomVerticalFlip(cfg.vflip)] if cfg.vflip > 0 else []),
                _colour_jitter(cfg),
                v2.RandomErasing(p=0.25, value=0),
            ]
        return v2.Compose(steps)
    if task == "detection":
        steps = _flips(cfg)
        if name == "yolo":
            steps += [
                v2.RandomAffine(
                    degrees=0.0,
                    translate=(cfg.translate, cfg.translate),
                    scale=cfg.scale,
                    fill={tv_tensors.Image: FILL_GREY, tv_tensors.Mask: 0, "others": 0},
                ),
                v2.RandomApply([crop], p=0.5),
                _colour_jitter(cfg),
            ]
        steps += [
            resize,
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=max(1.0, cfg.min_box_size), labels_getter=_target_fields),
            RecomputeArea(),
        ]
        return v2.Compose(steps)
    steps = [crop, *_flips(cfg), _colour_jitter(cfg)]  # segmentation
    if name == "elastic":
        steps.append(
            v2.ElasticTransform(
                alpha=cfg.elastic_alpha,
                sigma=cfg.elastic_sigma,
                fill={tv_tensors.Image: 0.0, tv_tensors.Mask: 255, "others": 0},
            )
        )
    return v2.Compose(steps)


# --------------------------------------------------------------------------- preview


def _palette(n: int) -> list[tuple[int, int, int]]:
    g = torch.Generator().manual_seed(1234)
    return [tuple(int(v) for v in torch.randint(40, 256, (3,), generator=g)) for _ in range(n)]


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image.as_subclass(torch.Tensor).clamp(0, 1) * 255).round().to(torch.uint8)


def _draw_detection(image: torch.Tensor, target: dict[str, Any], classes: list[str]) -> torch.Tensor:
    palette = _palette(len(classes) + 1)
    canvas = _to_uint8(image)
    labels = target["labels"].tolist()
    colours = [palette[k] for k in labels]
    if "masks" in target and len(labels):
        canvas = draw_segmentation_masks(
            canvas, target["masks"].as_subclass(torch.Tensor).bool(), alpha=0.45, colors=colours
        )
    if len(labels):
        canvas = draw_bounding_boxes(
            canvas,
            target["boxes"].as_subclass(torch.Tensor),
            labels=[classes[k - 1] for k in labels],
            colors=colours,
            width=1,
        )
    return canvas


def _draw_segmentation(image: torch.Tensor, mask: torch.Tensor, classes: list[str]) -> torch.Tensor:
    palette = _palette(len(classes) + 1)
    canvas = _to_uint8(image)
    mask = mask.as_subclass(torch.Tensor)
    ids = list(range(1, len(classes) + 1)) + [255]
    stack = torch.stack([mask == k for k in ids])
    colours = [palette[k] for k in range(1, len(classes) + 1)] + [(255, 255, 255)]
    return draw_segmentation_masks(canvas, stack, alpha=0.5, colors=colours)


def _describe(transform: Any) -> str:
    """The pipeline's repr without memory addresses, so policy.json is reproducible."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


#: the preview's views: (manifest task, augmentation task), in drawing order
_PREVIEW_VIEWS = (
    ("detection", "detection"),
    ("semantic_segmentation", "segmentation"),
    ("classification", "classification"),
)
#: independent draws of the training preset per preview row
_PREVIEW_DRAWS = 3


def write_preview(dataset: Path, cfg: AugmentConfig, out: Path) -> dict[str, Any]:
    """Draw, per view of the dataset, a PNG grid of augmented training samples; write ``policy.json``.

    Each grid row is one sample: the evaluation view first, then three independent draws of the
    training preset, with boxes (``draw_bounding_boxes``) and masks (``draw_segmentation_masks``)
    as the transforms left them. Samples and draws are seeded by ``augment.seed``.

    Args:
        dataset: canonical dataset folder.
        cfg: the ``augment`` params.
        out: output folder (``preview_<task>.png``, ``policy.json``).

    Returns:
        ``{"out", "previews": [paths], "policy": path, "presets": {task: name}}``.
    """
    from components.data.datasets import load_manifest

    dataset, out = Path(dataset), Path(out)
    manifest = load_manifest(dataset)
    split = "train" if "train" in manifest["splits"] else next(iter(manifest["splits"]))
    out.mkdir(parents=True, exist_ok=True)
    # one global seed for every view: the draws of a view depend on those of the views before it
    torch.manual_seed(cfg.seed)
    policy: dict[str, Any] = {
        "dataset": str(dataset),
        "split": split,
        "seed": cfg.seed,
        "augment": cfg.model_dump(mode="json"),
        "presets": {},
    }
    previews: list[str] = []
    for view, task in _PREVIEW_VIEWS:
        if view not in manifest["tasks"]:
            continue
        ds = build_preview_dataset(dataset, split, task, manifest["tasks"])
        if len(ds) == 0:
            continue
        path, policy["presets"][task] = write_task_preview(ds, task, cfg, out)
        previews.append(str(path))
    policy_path = out / "policy.json"
    write_json(policy, policy_path)
    return {
        "out": str(out),
        "previews": previews,
        "policy": str(policy_path),
        "presets": {t: p["name"] for t, p in policy["presets"].items()},
    }


def build_preview_dataset(dataset: Path, split: str, task: str, tasks: list[str]) -> Any:
    """The un-augmented dataset of one preview ``task`` (detection carries instance masks when the data has them)."""
    from components.data.datasets import ClassificationDataset, DetectionDataset, SegmentationDataset

    if task == "detection":
        return DetectionDataset(dataset, split, masks="instance_segmentation" in tasks)
    if task == "segmentation":
        return SegmentationDataset(dataset, split)
    return ClassificationDataset(dataset, split)


def write_task_preview(ds: Any, task: str, cfg: AugmentConfig, out: Path) -> tuple[Path, dict[str, Any]]:
    """Write ``preview_<task>.png`` for one view; return its path and its ``policy.json`` record.

    The image size follows the first sample (96 to 320 px) so small datasets stay legible; the
    samples are a seeded choice of ``cfg.preview_samples`` indices, in index order.
    """
    first = ds[0][0]
    size = int(min(320, max(96, max(first.shape[-2:]))))
    train_t = build_transforms(task, cfg, train=True, image_size=size)
    eval_t = build_transforms(task, cfg, train=False, image_size=size)
    g = torch.Generator().manual_seed(cfg.seed)
    indices = sorted(torch.randperm(len(ds), generator=g)[: cfg.preview_samples].tolist())
    cells = build_preview_cells(ds, task, indices, [eval_t] + [train_t] * _PREVIEW_DRAWS)
    grid = make_grid(cells, nrow=_PREVIEW_DRAWS + 1, padding=2, pad_value=255)
    path = out / f"preview_{task}.png"
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path, format="PNG", compress_level=6)
    record = {
        "name": getattr(cfg, task),
        "image_size": size,
        "train": _describe(train_t),
        "eval": _describe(eval_t),
        "samples": indices,
    }
    return path, record


def build_preview_cells(ds: Any, task: str, indices: list[int], transforms: list[Any]) -> list[torch.Tensor]:
    """One uint8 cell (Tensor[3, H, W]) per sample and transform, row by row, drawn as the transform left it."""
    cells: list[torch.Tensor] = []
    for i in indices:
        image, target = ds[i]
        for t in transforms:
            if task == "detection":
                # a fresh copy per draw: the transforms must not see another draw's boxes
                img, tgt = t(
                    image,
                    {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in target.items()},
                )
                cells.append(_draw_detection(img, tgt, ds.classes))
            elif task == "segmentation":
                img, msk = t(image, target)
                cells.append(_draw_segmentation(img, msk, ds.classes))
            else:
                cells.append(_to_uint8(t(image)))
    return cells
