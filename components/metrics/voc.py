"""Pascal VOC AP at one IoU threshold, ``difficult`` objects ignored.

:func:`evaluate_voc` follows the VOC devkit (``VOCevaldet.m`` /
``voc_eval.py``): each detection goes to the ground truth of highest IoU; IoU > 0.5 and that
ground truth not yet taken makes a TP; ``difficult`` objects are neither counted nor penalised;
AP is the 11-point interpolation (VOC2007) or the area under the monotone precision envelope at
every recall change (all-point, VOC2010+). Boxes here are continuous pixel coordinates, so the
devkit's ``+1`` on integer pixel indices is not applied, and crowd regions count as difficult.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from components.metrics.instances import Instances, mean_valid
from components.metrics.pairing import Pairs, pair_instances


def voc_ap(recall: np.ndarray, precision: np.ndarray, *, use_11_point: bool = False) -> float:
    """Average precision of one class from its raw PR curve, as the VOC devkit's ``voc_ap``.

    Args:
        recall (ndarray[N]): cumulative recall after each detection (by decreasing score).
        precision (ndarray[N]): cumulative precision after each detection.
        use_11_point: VOC2007's mean of the maximum precision at recall >= 0, 0.1, ..., 1;
            otherwise (VOC2010+) the area under the monotone envelope at every recall change.

    Returns:
        The AP in [0, 1].
    """
    if use_11_point:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            above = recall >= t
            ap += (float(np.max(precision[above])) if above.any() else 0.0) / 11.0
        return ap
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def evaluate_voc(
    gt: Instances,
    dt: Instances,
    *,
    num_categories: int,
    iou_threshold: float = 0.5,
    pairs: Pairs | None = None,
) -> dict[str, Any]:
    """Pascal VOC AP at one IoU threshold, 11-point and all-point, ``difficult`` ignored.

    Every detection (no per-image cap) goes to its highest-IoU ground truth of the same image and
    class (the first on ties); IoU > ``iou_threshold`` on a not-yet-detected object is a TP, on a
    detected one a FP (duplicate), on a difficult or crowd object nothing.

    Returns:
        ``{"map_50", "map_50_11point", "per_class_ap", "per_class_ap_11point", "num_gt"}`` with
        per-class lists in category order (-1 for classes without not-difficult ground truth,
        which the means exclude).
    """
    K = num_categories
    pairs = pairs or pair_instances(gt, dt, num_categories, "bbox")
    n_det = len(pairs.det_order)
    ovmax = np.full(n_det, -np.inf)
    jmax = np.full(n_det, -1, dtype=np.int64)
    if len(pairs.pair_det):
        seg = np.flatnonzero(np.r_[True, pairs.pair_det[1:] != pairs.pair_det[:-1]])
        dets = pairs.pair_det[seg]
        best = np.maximum.reduceat(pairs.iou, seg)
        is_best = pairs.iou == np.repeat(best, np.diff(np.r_[seg, len(pairs.iou)]))
        first = np.minimum.reduceat(np.where(is_best, np.arange(len(pairs.iou)), len(pairs.iou)), seg)
        ovmax[dets] = best
        jmax[dets] = pairs.pair_gt[first]

    g_skip = (gt.difficult | gt.iscrowd)[pairs.gt_order]
    hit = ovmax > iou_threshold
    ignored = hit & g_skip[np.maximum(jmax, 0)] if len(g_skip) else np.zeros(n_det, dtype=bool)
    det_idx = pairs.det_order
    order = np.lexsort((det_idx, -dt.score[det_idx], dt.category[det_idx]))
    order = order[~ignored[order]]
    claims = hit[order]
    tp = np.zeros(len(order), dtype=bool)
    claim_pos = np.flatnonzero(claims)
    _, first_claim = np.unique(
        jmax[order[claim_pos]], return_index=True
    )  # first detection of each object wins
    tp[claim_pos[first_claim]] = True
    cats = dt.category[det_idx[order]]
    bounds = np.searchsorted(cats, np.arange(K + 1))
    npos = np.bincount(gt.category[~(gt.difficult | gt.iscrowd)], minlength=K)

    ap_all, ap_11 = [], []
    for k in range(K):
        if npos[k] == 0:
            ap_all.append(-1.0)
            ap_11.append(-1.0)
            continue
        t = tp[bounds[k] : bounds[k + 1]]
        tp_sum = np.cumsum(t).astype(float)
        fp_sum = np.cumsum(~t).astype(float)
        rec = tp_sum / npos[k]
        prec = tp_sum / np.maximum(tp_sum + fp_sum, np.finfo(np.float64).eps)
        ap_all.append(voc_ap(rec, prec))
        ap_11.append(voc_ap(rec, prec, use_11_point=True))
    return {
        "map_50": mean_valid(np.array(ap_all)),
        "map_50_11point": mean_valid(np.array(ap_11)),
        "per_class_ap": ap_all,
        "per_class_ap_11point": ap_11,
        "num_gt": npos.tolist(),
    }
