"""Detections and ground truths of the same (image, category), paired with their COCO IoU.

Both the COCO and the VOC algorithm start here: detections sorted by (image, category, score
desc) with a *stable* sort (pycocotools' ``argsort(-score, kind="mergesort")``), ground truths by
(image, category) in file order, and every same-group (detection, ground truth) pair formed at
once with its IoU (boxes: :func:`~components.metrics.overlaps.paired_box_iou`, crowd-aware;
masks: ``pycocotools.mask.iou`` per group).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from components.metrics.instances import Instances, IouType
from components.metrics.overlaps import paired_box_iou, rle_iou


@dataclass
class Pairs:
    """Detections sorted by (image, category, score desc), their rank, and all same-group ground-truth pairs."""

    det_order: np.ndarray  # [D] indices into the detection Instances, group-sorted
    det_group: np.ndarray  # [D] image * K + category of each sorted detection
    det_rank: np.ndarray  # [D] rank of the detection by score within its (image, category)
    gt_order: np.ndarray  # [G] indices into the ground-truth Instances, group-sorted, file order kept
    pair_det: np.ndarray  # [P] sorted-detection index of each pair
    pair_gt: np.ndarray  # [P] sorted-ground-truth index of each pair
    iou: np.ndarray  # [P] COCO IoU (crowd: intersection / detection area)


def segment_starts(keys: np.ndarray) -> np.ndarray:
    """Start position of each element's run of equal consecutive ``keys``."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return np.repeat(change, np.diff(np.r_[change, n]))


def pair_instances(gt: Instances, dt: Instances, num_categories: int, iou_type: IouType) -> Pairs:
    """Sort detections and ground truths by (image, category) and form every same-group pair with its IoU.

    Detections are ordered by decreasing score inside a group with a stable sort (pycocotools'
    ``argsort(-score, kind="mergesort")``); ground truths keep their file order.
    """
    K = num_categories
    det_order = np.lexsort((np.arange(len(dt)), -dt.score, dt.category, dt.image))
    det_group = dt.image[det_order] * K + dt.category[det_order]
    det_rank = np.arange(len(dt)) - segment_starts(det_group)
    gt_order = np.lexsort((np.arange(len(gt)), gt.category, gt.image))
    gt_group = gt.image[gt_order] * K + gt.category[gt_order]

    g_start = np.searchsorted(gt_group, det_group, side="left")
    counts = np.searchsorted(gt_group, det_group, side="right") - g_start
    pair_det = np.repeat(np.arange(len(dt)), counts)
    first = np.cumsum(counts) - counts
    pair_gt = np.repeat(g_start, counts) + (np.arange(len(pair_det)) - np.repeat(first, counts))

    gt_crowd = gt.iscrowd[gt_order]
    if iou_type == "bbox":
        iou = paired_box_iou(dt.bbox[det_order][pair_det], gt.bbox[gt_order][pair_gt], gt_crowd[pair_gt])
    else:
        iou = _paired_mask_iou(gt, dt, det_order, gt_order, det_group, counts, first, g_start, gt_crowd)
    return Pairs(det_order, det_group, det_rank, gt_order, pair_det, pair_gt, iou)


def _paired_mask_iou(
    gt: Instances,
    dt: Instances,
    det_order: np.ndarray,
    gt_order: np.ndarray,
    det_group: np.ndarray,
    counts: np.ndarray,
    first: np.ndarray,
    g_start: np.ndarray,
    gt_crowd: np.ndarray,
) -> np.ndarray:
    """Mask IoU of every pair, one ``pycocotools.mask.iou`` call per (image, category) with pairs."""
    assert gt.rles is not None and dt.rles is not None
    iou = np.zeros(int(counts.sum()), dtype=np.float64)
    starts = (
        np.flatnonzero(np.r_[True, det_group[1:] != det_group[:-1]]) if len(det_group) else np.zeros(0, int)
    )
    ends = np.r_[starts[1:], len(det_group)].astype(np.int64) if len(starts) else starts
    for s, e in zip(starts, ends, strict=True):
        n_gt = counts[s]
        if n_gt == 0:
            continue
        gs = g_start[s]
        d = [dt.rles[i] for i in det_order[s:e]]
        g = [gt.rles[i] for i in gt_order[gs : gs + n_gt]]
        block = rle_iou(d, g, gt_crowd[gs : gs + n_gt])
        iou[first[s] : first[s] + block.size] = block.ravel()
    return iou
