"""Box formats, IoU, NMS and box merges for torch tensors, re-using :mod:`torchvision.ops`.

One box format inside the project: ``xyxy`` in pixels (``x1 < x2``, ``y1 < y2``, continuous
coordinates, area ``(x2 - x1) * (y2 - y1)``). Other formats (COCO's ``xywh``, YOLO's
``cxcywh``) are converted at the edges with :func:`box_convert`.

The lecture's intersection over union between a prediction :math:`\\hat B` and a target
:math:`B` is

.. math:: \\text{IoU}(B, \\hat B) = \\frac{\\text{area}(B \\cap \\hat B)}{\\text{area}(B \\cup \\hat B)}.

Pairwise IoU is torchvision's :func:`~torchvision.ops.box_iou`; NMS is
:func:`~torchvision.ops.batched_nms` (per class). The numpy, pycocotools-exact versions used by
the evaluator (crowd regions, RLE masks) live in :mod:`components.metrics.overlaps` so that the
evaluator does not import torch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchvision.ops import (
    batched_nms,
    box_area,
    box_convert,
    box_iou,
    clip_boxes_to_image,
    generalized_box_iou,
    masks_to_boxes,
    nms,
    remove_small_boxes,
)

BoxFormat = Literal["xyxy", "xywh", "cxcywh"]

__all__ = [
    "BoxFormat",
    "batched_nms",
    "box_area",
    "box_convert",
    "box_iou",
    "clip_boxes_to_image",
    "elementwise_box_iou",
    "generalized_box_iou",
    "masks_to_boxes",
    "merge_boxes",
    "nms",
    "pairwise_box_iou",
    "pairwise_mask_iou",
    "postprocess_detections",
    "remove_small_boxes",
    "rescale_boxes",
]


def pairwise_box_iou(boxes1: Tensor, boxes2: Tensor, *, fmt: BoxFormat = "xyxy") -> Tensor:
    """IoU of every box of ``boxes1`` with every box of ``boxes2``.

    Args:
        boxes1 (Tensor[N, 4]): boxes in ``fmt``.
        boxes2 (Tensor[M, 4]): boxes in ``fmt``.
        fmt: ``"xyxy"``, ``"xywh"`` (COCO) or ``"cxcywh"`` (YOLO).

    Returns:
        Tensor[N, M]: IoU in [0, 1] (0 for disjoint or empty boxes).
    """
    if fmt != "xyxy":
        boxes1 = box_convert(boxes1, fmt, "xyxy")
        boxes2 = box_convert(boxes2, fmt, "xyxy")
    return box_iou(boxes1, boxes2)


def elementwise_box_iou(
    boxes1: Tensor, boxes2: Tensor, *, fmt: BoxFormat = "xyxy", eps: float = 1e-9
) -> Tensor:
    """IoU of aligned pairs ``(boxes1[i], boxes2[i])``, differentiable.

    Used where each prediction has one target already (YOLO's responsible predictor, the
    confidence target :math:`\\Pr(\\text{object}) \\cdot \\text{IoU}^{\\text{truth}}_{\\text{pred}}`).

    Args:
        boxes1 (Tensor[..., 4]): boxes in ``fmt``.
        boxes2 (Tensor[..., 4]): boxes in ``fmt``, broadcastable with ``boxes1``.
        fmt: box format of both inputs.
        eps: added to the union so that two empty boxes give 0, not NaN.

    Returns:
        Tensor[...]: IoU of each pair.
    """
    if fmt != "xyxy":
        boxes1 = box_convert(boxes1, fmt, "xyxy")
        boxes2 = box_convert(boxes2, fmt, "xyxy")
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area1 = (boxes1[..., 2] - boxes1[..., 0]).clamp(min=0) * (boxes1[..., 3] - boxes1[..., 1]).clamp(min=0)
    area2 = (boxes2[..., 2] - boxes2[..., 0]).clamp(min=0) * (boxes2[..., 3] - boxes2[..., 1]).clamp(min=0)
    return inter / (area1 + area2 - inter + eps)


def pairwise_mask_iou(masks1: Tensor, masks2: Tensor) -> Tensor:
    """IoU of every binary mask of ``masks1`` with every mask of ``masks2``.

    Intersections are one matrix product of the flattened masks, so the cost is one
    ``[N, HW] @ [HW, M]`` product on the masks' device.

    Args:
        masks1 (Tensor[N, H, W]): binary masks (bool, or numbers where non-zero is foreground).
        masks2 (Tensor[M, H, W]): binary masks of the same size.

    Returns:
        Tensor[N, M]: float64 IoU (0 where both masks are empty).
    """
    if masks1.shape[-2:] != masks2.shape[-2:]:
        raise ValueError(f"mask sizes differ: {tuple(masks1.shape[-2:])} vs {tuple(masks2.shape[-2:])}")
    a = (masks1.reshape(masks1.shape[0], -1) != 0).to(torch.float64)
    b = (masks2.reshape(masks2.shape[0], -1) != 0).to(torch.float64)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def postprocess_detections(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    score_threshold: float = 0.05,
    nms_iou: float = 0.5,
    max_detections: int = 100,
    image_size: tuple[int, int] | None = None,
    min_size: float = 1e-2,
) -> tuple[Tensor, Tensor, Tensor]:
    """The detection contract's last step: clip, drop low scores and tiny boxes, per-class NMS, top-k.

    Args:
        boxes (Tensor[N, 4]): candidate boxes, xyxy pixels.
        scores (Tensor[N]): confidence of each candidate.
        labels (Tensor[N]): class of each candidate (1..K); NMS runs per class.
        score_threshold: candidates scoring below are dropped first.
        nms_iou: NMS suppresses a box whose IoU with a higher-scored box of its class exceeds this.
        max_detections: at most this many boxes are kept, highest scores first.
        image_size: ``(H, W)`` to clip boxes to, or None not to clip.
        min_size: boxes narrower or shorter than this (pixels) after clipping are dropped.

    Returns:
        ``(boxes Tensor[D, 4], scores Tensor[D], labels Tensor[D])``, sorted by decreasing score.
    """
    if image_size is not None:
        boxes = clip_boxes_to_image(boxes, image_size)
    keep = torch.where(scores >= score_threshold)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = remove_small_boxes(boxes, min_size)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_iou)[:max_detections]  # sorted by decreasing score
    return boxes[keep], scores[keep], labels[keep]


def merge_boxes(
    boxes: Tensor, scores: Tensor, labels: Tensor, *, iou_threshold: float = 0.3
) -> tuple[Tensor, Tensor, Tensor]:
    """OverFeat-style merging: fuse overlapping boxes of a class into one, instead of suppressing them.

    Boxes are visited by decreasing score (as NMS does); each kept box absorbs the boxes of its
    class that NMS would suppress (IoU above ``iou_threshold``) and becomes their score-weighted
    average; its score is the cluster's highest. With one box per cluster this is plain NMS.

    Args:
        boxes (Tensor[N, 4]): xyxy pixels.
        scores (Tensor[N]): confidence of each box.
        labels (Tensor[N]): class of each box; only boxes of the same class merge.
        iou_threshold: boxes overlapping a kept box by more than this join its cluster.

    Returns:
        ``(boxes Tensor[D, 4], scores Tensor[D], labels Tensor[D])`` of the merged boxes, by decreasing score.
    """
    if boxes.numel() == 0:
        return boxes.reshape(0, 4), scores, labels
    keep = batched_nms(boxes, scores, labels, iou_threshold)
    iou = box_iou(boxes[keep], boxes)  # [D, N]
    same_class = labels[keep][:, None] == labels[None, :]
    member = (iou > iou_threshold) & same_class
    member[torch.arange(keep.numel(), device=boxes.device), keep] = True
    # A box overlapping several kept boxes joins the highest-scored one (the one whose NMS pass removed it).
    first = member.float().argmax(dim=0)  # keep is sorted by score, so the first True is the best cluster
    assigned = torch.zeros_like(member)
    assigned[first, torch.arange(boxes.shape[0], device=boxes.device)] = True
    assigned &= member
    weights = assigned.to(boxes.dtype) * scores[None, :].to(boxes.dtype)
    merged = (weights @ boxes) / weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(boxes.dtype).tiny)
    return merged, scores[keep], labels[keep]


def rescale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """Map xyxy boxes from an image of ``from_size`` ``(H, W)`` to one of ``to_size`` ``(H, W)``.

    Args:
        boxes (Tensor[N, 4]): xyxy pixels in the ``from_size`` image.
        from_size: ``(H, W)`` the boxes refer to (e.g. the network's input).
        to_size: ``(H, W)`` to map them to (e.g. the original image).

    Returns:
        Tensor[N, 4]: xyxy pixels in the ``to_size`` image.
    """
    sy = to_size[0] / from_size[0]
    sx = to_size[1] / from_size[1]
    scale = torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)
    return boxes * scale
