"""The instance contract of the detection metrics: per-image records in, columns out.

Predictions and targets arrive per image in the project's detection contract (torchvision's
``GeneralizedRCNN``): ``{boxes (xyxy pixels), labels (1..K), scores}`` and ``{boxes, labels,
[iscrowd], [difficult], [area], [masks], [image_id]}``. :func:`record_to_instances` validates one
record and turns it into :class:`Instances`, the columnar form (COCO ``xywh`` boxes, category
indices 0..K-1) that the COCO and VOC algorithms and the COCO file reader all share.

numpy and ``pycocotools.mask`` only: no torch import (tensors are read through ``.detach()``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from components.errors import EvaluationError
from components.metrics.overlaps import RLE, encode_masks, rle_area, xyxy_to_xywh

IouType = Literal["bbox", "segm"]


@dataclass
class Instances:
    """Columnar ground truths or detections of a whole evaluation set.

    Attributes:
        image (ndarray[N] int64): index of the instance's image in the image list (0..I-1).
        category (ndarray[N] int64): index of the category in the category list (0..K-1).
        bbox (ndarray[N, 4] float64): COCO xywh pixels.
        area (ndarray[N] float64): ground truth: the annotation's ``area``; detection: box or mask area.
        score (ndarray[N] float64): detection confidence (zeros for ground truth).
        iscrowd (ndarray[N] bool): crowd region (ground truth only).
        difficult (ndarray[N] bool): VOC ``difficult`` flag (ground truth only).
        ann_id (ndarray[N] int64): annotation id (ground truth; pycocotools treats a match to id 0 as no match).
        rles (list[RLE] | None): masks as COCO RLE, for ``segm``.
    """

    image: np.ndarray
    category: np.ndarray
    bbox: np.ndarray
    area: np.ndarray
    score: np.ndarray
    iscrowd: np.ndarray
    difficult: np.ndarray
    ann_id: np.ndarray
    rles: list[RLE] | None = None

    def __len__(self) -> int:
        return len(self.image)

    @classmethod
    def empty(cls, with_masks: bool = False) -> Instances:
        """No instances (``rles`` an empty list when ``with_masks``)."""
        z = np.zeros(0, dtype=np.int64)
        f = np.zeros(0, dtype=np.float64)
        b = np.zeros(0, dtype=bool)
        return cls(
            z, z.copy(), np.zeros((0, 4)), f, f.copy(), b, b.copy(), z.copy(), [] if with_masks else None
        )

    @classmethod
    def concatenate(cls, parts: Sequence[Instances], with_masks: bool = False) -> Instances:
        """Join the columns of several batches (order kept)."""
        if not parts:
            return cls.empty(with_masks)
        rles: list[RLE] | None = None
        if with_masks:
            rles = [r for p in parts for r in (p.rles or [])]
        return cls(
            np.concatenate([p.image for p in parts]).astype(np.int64),
            np.concatenate([p.category for p in parts]).astype(np.int64),
            np.concatenate([p.bbox for p in parts]).reshape(-1, 4).astype(np.float64),
            np.concatenate([p.area for p in parts]).astype(np.float64),
            np.concatenate([p.score for p in parts]).astype(np.float64),
            np.concatenate([p.iscrowd for p in parts]).astype(bool),
            np.concatenate([p.difficult for p in parts]).astype(bool),
            np.concatenate([p.ann_id for p in parts]).astype(np.int64),
            rles,
        )


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if dtype is not None and str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def record_to_instances(
    d: Mapping[str, Any],
    *,
    index: int,
    image_id: int,
    is_pred: bool,
    num_categories: int,
    iou_type: IouType = "bbox",
    mask_threshold: float = 0.5,
) -> Instances:
    """One image's prediction or target of the detection contract, validated, as columns.

    Args:
        d: a prediction ``{boxes (Tensor[N, 4] xyxy pixels), scores (Tensor[N]), labels (Tensor[N]
            int 1..K), [masks (Tensor[N, 1, H, W] probabilities or Tensor[N, H, W] binary)]}`` or a
            target ``{boxes, labels, [iscrowd], [difficult], [area], [masks], [image_id]}``.
        index: the image's index in the evaluation set (the ``image`` column).
        image_id: the image's id, for messages.
        is_pred: ``d`` is a prediction (``scores`` required; flags and ``area`` not read).
        num_categories: K; labels must be 1..K.
        iou_type: ``"segm"`` also requires and encodes ``masks``.
        mask_threshold: predicted mask probabilities at or above this are foreground.

    Returns:
        The instances, ``category`` = label - 1, ``bbox`` COCO xywh (``w = x2 - x1``), ann ids 1..N.

    Raises:
        EvaluationError: naming the image and what is wrong (missing key, shapes, labels outside
            1..K, non-finite numbers, masks missing for segm).
    """
    what = "prediction" if is_pred else "target"
    record = f"{what} of image_id {image_id}"
    boxes, labels = read_boxes_and_labels(d, record=record, is_pred=is_pred, num_categories=num_categories)
    n = len(boxes)
    bbox = xyxy_to_xywh(boxes)
    score = read_scores(d, n, record=record) if is_pred else np.zeros(n)
    rles = read_masks(d, n, record=record, mask_threshold=mask_threshold) if iou_type == "segm" else None
    if not is_pred and "area" in d:
        area = to_numpy(d["area"], np.float64).reshape(-1)
    else:
        area = rle_area(rles) if rles is not None else bbox[:, 2] * bbox[:, 3]
    flags = read_flags(d, n, record=record, is_pred=is_pred)
    return Instances(
        image=np.full(n, index, dtype=np.int64),
        category=labels - 1,
        bbox=bbox,
        area=area,
        score=score,
        iscrowd=flags["iscrowd"],
        difficult=flags["difficult"],
        ann_id=np.arange(1, n + 1, dtype=np.int64),  # ids only matter for being non-zero
        rles=rles,
    )


def read_boxes_and_labels(
    d: Mapping[str, Any], *, record: str, is_pred: bool, num_categories: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes ndarray[N, 4] xyxy float64, labels ndarray[N] int64)`` of a record, checked.

    Raises:
        EvaluationError: a required key is missing (``scores`` too for a prediction), the shapes
            disagree, a label is outside 1..K, or a coordinate is not finite.
    """
    what = "prediction" if is_pred else "target"
    for key in ("boxes", "labels") + (("scores",) if is_pred else ()):
        if key not in d:
            raise EvaluationError(
                f"missing {key!r}",
                record=record,
                fix=f"a {what} holds boxes, labels" + (", scores" if is_pred else ""),
            )
    boxes = to_numpy(d["boxes"], np.float64)
    if boxes.size and (boxes.ndim != 2 or boxes.shape[1] != 4):
        raise EvaluationError(
            f"boxes of shape {boxes.shape}", record=record, fix="boxes are Tensor[N, 4] xyxy pixels"
        )
    boxes = boxes.reshape(-1, 4)
    labels = to_numpy(d["labels"]).reshape(-1).astype(np.int64)
    n = len(boxes)
    if len(labels) != n:
        raise EvaluationError(f"{n} boxes but {len(labels)} labels", record=record, fix="one label per box")
    if n and (labels.min() < 1 or labels.max() > num_categories):
        raise EvaluationError(
            f"label {int(labels.min() if labels.min() < 1 else labels.max())} outside 1..{num_categories}",
            record=record,
            fix="labels are 1..K (0 is background and never a detection)",
        )
    if not np.isfinite(boxes).all():
        raise EvaluationError(
            "non-finite box coordinates", record=record, fix="drop NaN/inf boxes before evaluation"
        )
    return boxes, labels


def read_scores(d: Mapping[str, Any], n: int, *, record: str) -> np.ndarray:
    """A prediction's ``scores`` as ndarray[N] float64; one finite score per box, else EvaluationError."""
    score = to_numpy(d["scores"], np.float64).reshape(-1)
    if len(score) != n:
        raise EvaluationError(
            f"{n} boxes but {len(score)} scores", record=record, fix="one score per box"
        )
    if not np.isfinite(score).all():
        raise EvaluationError("NaN or infinite score", record=record, fix="check the model's outputs")
    return score


def read_masks(d: Mapping[str, Any], n: int, *, record: str, mask_threshold: float) -> list[RLE]:
    """The record's ``masks`` as COCO RLEs, binarised first (probabilities at ``mask_threshold``, integers != 0).

    Takes ``Tensor[N, 1, H, W]`` or ``Tensor[N, H, W]``; raises EvaluationError when ``masks`` is missing.
    """
    if "masks" not in d:
        raise EvaluationError(
            "missing 'masks' for segm evaluation",
            record=record,
            fix="pass masks or use iou_type='bbox'",
        )
    masks = to_numpy(d["masks"])
    if masks.ndim == 4:
        masks = masks[:, 0]
    masks = masks.reshape(n, *masks.shape[-2:]) if n else masks.reshape(0, *masks.shape[-2:])
    binary = masks >= mask_threshold if masks.dtype.kind == "f" else masks != 0
    return encode_masks(binary)


def read_flags(d: Mapping[str, Any], n: int, *, record: str, is_pred: bool) -> dict[str, np.ndarray]:
    """A target's ``iscrowd`` and ``difficult`` flags as ndarray[N] bool (all False when absent, or for a prediction)."""
    flags = {}
    for key in ("iscrowd", "difficult"):
        flags[key] = (
            to_numpy(d[key]).reshape(-1).astype(bool) if (not is_pred and key in d) else np.zeros(n, bool)
        )
        if len(flags[key]) != n:
            raise EvaluationError(
                f"{n} boxes but {len(flags[key])} {key} flags",
                record=record,
                fix=f"one {key} flag per box",
            )
    return flags


def mean_valid(values: np.ndarray) -> float:
    """Mean of the defined entries of ``values`` (-1 marks "undefined", e.g. a class without ground truth); -1 if none."""
    valid = values[values > -1]
    return -1.0 if len(valid) == 0 else float(np.mean(valid))
