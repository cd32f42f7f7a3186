"""The class confusion of detections against ground truth (the YOLOv5 recipe), with a background class."""

from __future__ import annotations

import numpy as np

from components.metrics.instances import Instances
from components.metrics.overlaps import paired_box_iou


def detection_confusion_matrix(
    gt: Instances,
    dt: Instances,
    *,
    num_categories: int,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.25,
) -> np.ndarray:
    """Class confusion of detections against ground truth, with a background row and column.

    Detections scoring at least ``score_threshold`` are paired with the ground truths of their
    image (any class) at box IoU >= ``iou_threshold``; pairs are taken by decreasing IoU, one per
    detection and one per ground truth (the YOLOv5 recipe). A matched pair counts at
    ``[true class, predicted class]``, a missed object at ``[class, background]``, an unmatched
    detection at ``[background, class]``. Crowd and difficult objects are left out, and so are
    detections that overlap only them.

    Returns:
        ndarray[K + 1, K + 1] int64: rows are ground truth, columns predictions; index K is background.
    """
    K = num_categories
    cm = np.zeros((K + 1, K + 1), dtype=np.int64)
    keep = np.flatnonzero(dt.score >= score_threshold)
    d_order = keep[np.argsort(dt.image[keep], kind="stable")]
    g_order = np.argsort(gt.image, kind="stable")
    g_img = gt.image[g_order]
    d_img = dt.image[d_order]
    g_start = np.searchsorted(g_img, d_img, side="left")
    counts = np.searchsorted(g_img, d_img, side="right") - g_start
    pd = np.repeat(np.arange(len(d_order)), counts)
    first = np.cumsum(counts) - counts
    pg = np.repeat(g_start, counts) + (np.arange(len(pd)) - np.repeat(first, counts))
    iou = paired_box_iou(dt.bbox[d_order][pd], gt.bbox[g_order][pg])
    skip = (gt.iscrowd | gt.difficult)[g_order]
    ok = iou >= iou_threshold
    pd, pg, iou = pd[ok], pg[ok], iou[ok]
    on_skipped = np.zeros(len(d_order), dtype=bool)
    on_skipped[pd[skip[pg]]] = True
    normal = ~skip[pg]
    pd, pg, iou = pd[normal], pg[normal], iou[normal]
    o = np.argsort(-iou, kind="stable")
    pd, pg = pd[o], pg[o]
    _, u = np.unique(pd, return_index=True)
    pd, pg = pd[u], pg[u]
    o = np.argsort(u)  # back to decreasing IoU among the survivors
    pd, pg = pd[o], pg[o]
    _, u = np.unique(pg, return_index=True)
    pd, pg = pd[u], pg[u]
    d_cat = dt.category[d_order]
    g_cat = gt.category[g_order]
    np.add.at(cm, (g_cat[pg], d_cat[pd]), 1)
    g_matched = np.zeros(len(g_order), dtype=bool)
    g_matched[pg] = True
    missed = ~g_matched & ~skip
    np.add.at(cm, (g_cat[missed], K), 1)
    d_matched = np.zeros(len(d_order), dtype=bool)
    d_matched[pd] = True
    false_alarm = ~d_matched & ~(on_skipped & ~d_matched)
    np.add.at(cm, (K, d_cat[false_alarm]), 1)
    return cm
