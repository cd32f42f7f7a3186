"""IoU of boxes and masks in numpy, bit-for-bit as pycocotools computes them (no torch needed).

The lecture's IoU, :math:`\\text{area}(B \\cap \\hat B) / \\text{area}(B \\cup \\hat B)`, with COCO's one
twist: for a *crowd* ground-truth region the union is replaced by the detection's own area,
:math:`\\text{area}(B \\cap \\hat B) / \\text{area}(\\hat B)`, so a detection lying inside a crowd
region overlaps it fully however large the region is.

Boxes are computed in COCO's ``xywh`` layout with exactly the floating-point operations of
pycocotools' ``bbIou`` (``maskApi.c``): ``w = min(x_d + w_d, x_g + w_g) - max(x_d, x_g)``, the
same for ``h``, ``IoU = w h / (a_d + a_g - w h)``. Using the same operations gives the same
doubles, so matches decided by ``IoU >= t`` and ties between equal IoUs come out as in
pycocotools. Masks are run-length encoded (RLE) with :mod:`pycocotools.mask` and their IoU is
``pycocotools.mask.iou``; binary masks can also be compared directly with one matrix product.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

RLE = dict[str, Any]


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """``(x1, y1, x2, y2)`` to COCO's ``(x, y, w, h)``.

    Args:
        boxes (ndarray[N, 4]): xyxy.

    Returns:
        ndarray[N, 4]: float64 xywh.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """COCO's ``(x, y, w, h)`` to ``(x1, y1, x2, y2)``.

    Args:
        boxes (ndarray[N, 4]): xywh.

    Returns:
        ndarray[N, 4]: float64 xyxy.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)


def paired_box_iou(dt: np.ndarray, gt: np.ndarray, iscrowd: np.ndarray | None = None) -> np.ndarray:
    """IoU of aligned pairs ``(dt[i], gt[i])`` in xywh, as pycocotools' ``bbIou``.

    Args:
        dt (ndarray[P, 4]): detection boxes, xywh float64.
        gt (ndarray[P, 4]): ground-truth boxes, xywh float64.
        iscrowd (ndarray[P] | None): True where ``gt[i]`` is a crowd region (union := area of ``dt[i]``).

    Returns:
        ndarray[P]: float64 IoU (0 where the boxes do not overlap).
    """
    dx, dy, dw, dh = dt[:, 0], dt[:, 1], dt[:, 2], dt[:, 3]
    gx, gy, gw, gh = gt[:, 0], gt[:, 1], gt[:, 2], gt[:, 3]
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    overlap = (w > 0) & (h > 0)
    inter = w * h
    da = dw * dh
    union = da + gw * gh - inter
    if iscrowd is not None:
        union = np.where(iscrowd, da, union)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where(overlap, iou, 0.0)


def box_iou_xywh(
    dt: np.ndarray, gt: np.ndarray, iscrowd: Sequence[bool] | np.ndarray | None = None
) -> np.ndarray:
    """Pairwise IoU of xywh boxes, equal to ``pycocotools.mask.iou(dt, gt, iscrowd)``.

    Args:
        dt (ndarray[D, 4]): detection boxes, xywh.
        gt (ndarray[G, 4]): ground-truth boxes, xywh.
        iscrowd (ndarray[G] | None): crowd flag of each ground truth.

    Returns:
        ndarray[D, G]: float64 IoU.
    """
    dt = np.asarray(dt, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    d_idx, g_idx = np.meshgrid(np.arange(len(dt)), np.arange(len(gt)), indexing="ij")
    crowd = None if iscrowd is None else np.asarray(iscrowd, dtype=bool)[g_idx.ravel()]
    return paired_box_iou(dt[d_idx.ravel()], gt[g_idx.ravel()], crowd).reshape(len(dt), len(gt))


def box_iou_xyxy(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes (numpy twin of ``torchvision.ops.box_iou``).

    Args:
        boxes1 (ndarray[N, 4]): xyxy.
        boxes2 (ndarray[M, 4]): xyxy.

    Returns:
        ndarray[N, M]: float64 IoU.
    """
    return box_iou_xywh(xyxy_to_xywh(boxes1), xyxy_to_xywh(boxes2))


def encode_masks(masks: np.ndarray) -> list[RLE]:
    """Binary masks to COCO compressed RLE (``counts`` as str, JSON-ready).

    Args:
        masks (ndarray[N, H, W]): non-zero is foreground.

    Returns:
        list of N RLE dicts ``{"size": [H, W], "counts": str}``.
    """
    m = np.asarray(masks)
    if m.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {m.shape}")
    if len(m) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray((m != 0).transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def rle_area(rles: Sequence[RLE]) -> np.ndarray:
    """Foreground pixel count of each RLE (``pycocotools.mask.area``).

    Returns:
        ndarray[N]: float64 areas.
    """
    if len(rles) == 0:
        return np.zeros(0, dtype=np.float64)
    # pycocotools' area() builds np.array((n,), dtype=uint8) internally: under numpy 2 it overflows
    # for n > 255 RLEs, so it is called on chunks of 255.
    rles = list(rles)
    return np.concatenate(
        [
            np.asarray(mask_utils.area(rles[i : i + 255]), dtype=np.float64).reshape(-1)
            for i in range(0, len(rles), 255)
        ]
    )


def rle_iou(
    dt: Sequence[RLE], gt: Sequence[RLE], iscrowd: Sequence[bool] | np.ndarray | None = None
) -> np.ndarray:
    """Pairwise IoU of RLE masks (``pycocotools.mask.iou``), crowd-aware.

    Args:
        dt: D detection RLEs.
        gt: G ground-truth RLEs (same ``size`` as the detections; a size mismatch gives -1, as in pycocotools).
        iscrowd: crowd flag of each ground truth.

    Returns:
        ndarray[D, G]: float64 IoU.
    """
    if len(dt) == 0 or len(gt) == 0:
        return np.zeros((len(dt), len(gt)), dtype=np.float64)
    crowd = [0] * len(gt) if iscrowd is None else [int(c) for c in iscrowd]
    return np.asarray(mask_utils.iou(list(dt), list(gt), crowd), dtype=np.float64).reshape(len(dt), len(gt))


def mask_iou(
    dt: np.ndarray, gt: np.ndarray, iscrowd: Sequence[bool] | np.ndarray | None = None
) -> np.ndarray:
    """Pairwise IoU of binary masks by one matrix product, crowd-aware.

    Args:
        dt (ndarray[D, H, W]): detection masks, non-zero is foreground.
        gt (ndarray[G, H, W]): ground-truth masks of the same size.
        iscrowd (ndarray[G] | None): crowd flag of each ground truth (union := detection area).

    Returns:
        ndarray[D, G]: float64 IoU (0 where the intersection is empty).
    """
    a = (np.asarray(dt) != 0).reshape(len(dt), -1).astype(np.float64)
    b = (np.asarray(gt) != 0).reshape(len(gt), -1).astype(np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"mask sizes differ: {np.asarray(dt).shape[1:]} vs {np.asarray(gt).shape[1:]}")
    inter = a @ b.T  # exact: integer counts well below 2**53
    area_d = a.sum(1)[:, None]
    union = area_d + b.sum(1)[None, :] - inter
    if iscrowd is not None:
        union = np.where(np.asarray(iscrowd, dtype=bool)[None, :], area_d, union)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / union, 0.0)
