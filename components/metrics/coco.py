"""COCO detection evaluation, reproducing ``pycocotools.cocoeval.COCOeval`` to the last bit.

The lecture: a prediction is a true positive when its IoU with an annotated box exceeds a
threshold, TP and FP are accumulated over decreasing confidence, the area under the resulting
precision-recall curve is the class's *average precision* (AP) and the mean over classes is the
*mean average precision* (mAP), with precision = TP / all detections and recall = TP / all
ground truths.

:func:`evaluate_coco` makes this exact in the way ``COCOeval`` does (tests check within 1e-9):

* per image and category, detections sorted by decreasing score with a *stable* sort and cut to
  the 100 best; ground truths ignored when ``iscrowd`` or their annotation ``area`` is outside
  the area range (all ``[0, 1e10]``, small ``[0, 32^2]``, medium ``[32^2, 96^2]``, large
  ``[96^2, 1e10]``);
* greedy matching at each IoU threshold ``t`` in .50:.05:.95: a detection takes the unmatched,
  not-ignored ground truth of highest IoU ``>= t`` (the last one on equal IoU); failing that an
  ignored one (crowd regions can absorb any number of detections; crowd IoU = intersection /
  area(detection)); a detection matched to an ignored region, or unmatched and outside the area
  range, is ignored (neither TP nor FP);
* per category, detections of all images sorted again by score (stable, images in id order),
  cumulative TP/FP, recall = TP / #not-ignored ground truths, precision made monotone (the
  envelope) and read at 101 recall points with ``searchsorted(recall, r, side="left")``;
* AP is the mean over IoU thresholds, recall points and categories that have ground truth
  (-1 marks "no ground truth" and is excluded); AR is the mean recall.

Instead of pycocotools' three Python loops per detection (threshold x detection x ground
truth), the matching here is vectorised: all (detection, ground truth) pairs of the same image
and category are formed at once, their IoU computed in one numpy expression, and the greedy
order is kept by a loop over the *rank* of a detection among the candidate detections of its
image and category (at most 100 steps), each step deciding one detection of every image and
category, for all thresholds and area ranges together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from components.metrics.instances import Instances, IouType, mean_valid
from components.metrics.pairing import Pairs, pair_instances, segment_starts

# pycocotools' Params.setDetParams, to the bit.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETECTIONS = (1, 10, 100)
AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0**2, 1e5**2),
    "small": (0.0**2, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}
COCO_METRIC_NAMES = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)


@dataclass
class CocoAccumulation:
    """What ``COCOeval.accumulate`` produces, in its layout.

    Attributes:
        precision (ndarray[T, R, K, A, M]): interpolated precision (-1: category without ground truth).
        recall (ndarray[T, K, A, M]): final recall (-1 likewise).
        scores (ndarray[T, R, K, A, M]): score at which each recall point is reached.
        num_gt (ndarray[K]): not-ignored ground truths per category (area "all").
    """

    precision: np.ndarray
    recall: np.ndarray
    scores: np.ndarray
    num_gt: np.ndarray


def _coco_match(gt: Instances, dt: Instances, pairs: Pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy COCO matching of the 100 best detections per (image, category), all thresholds and areas.

    Returns:
        ``kept`` (ndarray[Dk]) sorted-detection indices with rank < 100, and ``tp``, ``fp``
        (ndarray[T, A, Dk] bool) for them (a detection that is neither is ignored).
    """
    T, A = len(IOU_THRESHOLDS), len(AREA_RANGES)
    ranges = np.array(list(AREA_RANGES.values()))  # [A, 2]
    g_area = gt.area[pairs.gt_order]
    g_crowd = gt.iscrowd[pairs.gt_order]
    g_ignore = (
        g_crowd[None, :] | (g_area[None, :] < ranges[:, :1]) | (g_area[None, :] > ranges[:, 1:])
    )  # [A, G]
    g_id_zero = gt.ann_id[pairs.gt_order] == 0

    n_det = len(pairs.det_order)
    kept_det = pairs.det_rank < MAX_DETECTIONS[-1]
    thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)  # as pycocotools: min([t, 1 - 1e-10])
    cand = np.flatnonzero(kept_det[pairs.pair_det] & (pairs.iou >= thresholds[0]))
    c_det, c_gt, c_iou = pairs.pair_det[cand], pairs.pair_gt[cand], pairs.iou[cand]

    # Detections in accumulate's order: per category, decreasing score; ties keep image order,
    # then the within-image order (pycocotools concatenates per-image lists, then mergesorts).
    kept = np.flatnonzero(kept_det)
    det_idx = pairs.det_order[kept]
    kept = kept[
        np.lexsort((pairs.det_rank[kept], dt.image[det_idx], -dt.score[det_idx], dt.category[det_idx]))
    ]
    column_of = np.full(n_det, -1, dtype=np.int64)
    column_of[kept] = np.arange(len(kept))
    d_area = dt.area[pairs.det_order[kept]]
    d_out = (d_area[None, :] < ranges[:, :1]) | (d_area[None, :] > ranges[:, 1:])  # [A, Dk]
    # Unmatched detections: ignored outside the area range, else FP. Matches overwrite below.
    tp = np.zeros((T, A, len(kept)), dtype=bool)
    fp = np.broadcast_to(~d_out, (T, A, len(kept))).copy()

    # Candidate detections (some IoU >= .5) and their rank among the candidates of their group;
    # pairs are det-major, so the candidates come out sorted.
    cand_det = c_det[np.r_[True, c_det[1:] != c_det[:-1]]] if len(c_det) else c_det
    cand_rank_of = np.full(n_det, -1, dtype=np.int64)
    cand_rank_of[cand_det] = np.arange(len(cand_det)) - segment_starts(pairs.det_group[cand_det])

    # Pairs ordered by (candidate rank, detection, IoU, ground-truth order): each rank is one slice,
    # each detection a segment in it whose last eligible element is pycocotools' choice.
    c_rank = cand_rank_of[c_det]
    o = np.lexsort((c_gt, c_iou, c_det, c_rank))
    c_det, c_gt, c_iou, c_rank = c_det[o], c_gt[o], c_iou[o], c_rank[o]
    n_ranks = int(c_rank[-1]) + 1 if len(c_rank) else 0
    bounds = np.searchsorted(c_rank, np.arange(n_ranks + 1))

    matched = np.zeros((T, A, len(g_area)), dtype=bool)  # gtm > 0
    thr = thresholds[:, None, None]
    for r in range(n_ranks):
        s, e = bounds[r], bounds[r + 1]
        g, v, d = c_gt[s:e], c_iou[s:e], c_det[s:e]
        seg = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
        pos = np.arange(e - s) - np.repeat(seg, np.diff(np.r_[seg, e - s]))
        big = e - s + 1
        # "if this gt already matched, and not a crowd, continue" / "continue unless better match made"
        eligible = (v >= thr) & (g_crowd[g] | ~matched[:, :, g])  # [T, A, L]
        # a not-ignored ground truth always wins over an ignored one ("... and on ignore gt, stop")
        key = np.where(eligible, (~g_ignore[:, g])[None] * big + pos, -1)
        best = np.maximum.reduceat(key, seg, axis=2)  # [T, A, S]
        ti, ai, si = np.nonzero(best >= 0)
        chosen = g[seg[si] + best[ti, ai, si] % big]
        matched[ti, ai, chosen] = True
        col = column_of[d[seg[si]]]
        # dtm holds the matched gt's id: pycocotools reads an id of 0 as "unmatched".
        dtm = ~g_id_zero[chosen]
        dt_ignore = g_ignore[ai, chosen] | (~dtm & d_out[ai, col])
        tp[ti, ai, col] = dtm & ~dt_ignore
        fp[ti, ai, col] = ~dtm & ~dt_ignore
    return kept, tp, fp


def _accumulate(
    gt: Instances,
    dt: Instances,
    pairs: Pairs,
    num_categories: int,
    kept: np.ndarray,
    tp: np.ndarray,
    fp: np.ndarray,
    *,
    all_max_dets: bool = False,
) -> CocoAccumulation:
    """``COCOeval.accumulate``: precision at 101 recall points and recall, per threshold/category/area/maxDets.

    ``kept``, ``tp`` and ``fp`` come from :func:`_coco_match`, in accumulate's order. The final
    recall needs no curve, so only maxDets=100 (the one ``summarize`` reads) gets precision
    curves unless ``all_max_dets`` (then every slot equals pycocotools' array).
    """
    T, R, K, A, M = (
        len(IOU_THRESHOLDS),
        len(RECALL_THRESHOLDS),
        num_categories,
        len(AREA_RANGES),
        len(MAX_DETECTIONS),
    )
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    scores = -np.ones((T, R, K, A, M))

    ranges = np.array(list(AREA_RANGES.values()))
    not_ignored = (
        ~gt.iscrowd[None, :] & (gt.area[None, :] >= ranges[:, :1]) & (gt.area[None, :] <= ranges[:, 1:])
    )
    npig = np.stack(
        [np.bincount(gt.category[not_ignored[a]], minlength=K) for a in range(A)], axis=1
    )  # [K, A]

    det_idx = pairs.det_order[kept]
    d_cat, d_score, d_rank = dt.category[det_idx], dt.score[det_idx], pairs.det_rank[kept]
    cat_bounds = np.searchsorted(d_cat, np.arange(K + 1))
    has_gt = npig > 0  # [K, A]
    for k in range(K):
        if not has_gt[k].any():
            continue
        s, e = cat_bounds[k], cat_bounds[k + 1]
        for mi, max_det in enumerate(MAX_DETECTIONS):
            sel = slice(s, e) if max_det >= MAX_DETECTIONS[-1] else np.flatnonzero(d_rank[s:e] < max_det) + s
            tp_k, fp_k = tp[:, :, sel], fp[:, :, sel]  # [T, A, n]
            n_pos = np.where(has_gt[k], npig[k], 1)[None, :]
            nd = tp_k.shape[2]
            if max_det < MAX_DETECTIONS[-1] and not all_max_dets:
                # only the final recall is read by summarize: TP count / #ground truths
                rc_last = tp_k.sum(axis=2) / n_pos if nd else np.zeros((T, A))
                recall[:, k, :, mi] = np.where(has_gt[k][None, :], rc_last, -1)
                continue
            tp_sum = np.cumsum(tp_k, axis=2, dtype=np.float64)
            fp_sum = np.cumsum(fp_k, axis=2, dtype=np.float64)
            rc = tp_sum / n_pos[:, :, None]
            pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
            recall[:, k, :, mi] = np.where(has_gt[k][None, :], rc[:, :, -1] if nd else 0, -1)
            pr = np.maximum.accumulate(pr[:, :, ::-1], axis=2)[:, :, ::-1]  # the monotone envelope
            sc = d_score[sel]
            for a in np.flatnonzero(has_gt[k]):
                q = np.zeros((T, R))
                ss = np.zeros((T, R))
                for t in range(T):
                    inds = np.searchsorted(rc[t, a], RECALL_THRESHOLDS, side="left")
                    valid = inds < nd  # pycocotools stops at the first recall point beyond the curve
                    q[t, valid] = pr[t, a, inds[valid]]
                    ss[t, valid] = sc[inds[valid]]
                precision[:, :, k, a, mi] = q
                scores[:, :, k, a, mi] = ss
    return CocoAccumulation(precision, recall, scores, npig[:, 0].copy())


def summarize_coco(acc: CocoAccumulation) -> dict[str, float]:
    """``COCOeval.summarize``'s 12 numbers, named as torchmetrics names them.

    Args:
        acc: the accumulated precision/recall.

    Returns:
        ``{map, map_50, map_75, map_small, map_medium, map_large, mar_1, mar_10, mar_100,
        mar_small, mar_medium, mar_large}`` (-1 when no category has ground truth).
    """
    areas = list(AREA_RANGES)
    m100 = MAX_DETECTIONS.index(100)

    def ap(t: int | None = None, area: str = "all") -> float:
        s = acc.precision if t is None else acc.precision[[t]]
        return mean_valid(s[:, :, :, [areas.index(area)], [m100]])

    def ar(max_det: int = 100, area: str = "all") -> float:
        return mean_valid(acc.recall[:, :, [areas.index(area)], [MAX_DETECTIONS.index(max_det)]])

    t50 = int(np.where(IOU_THRESHOLDS == 0.5)[0][0])
    t75 = int(np.where(IOU_THRESHOLDS == 0.75)[0][0])
    values = [
        ap(),
        ap(t50),
        ap(t75),
        ap(area="small"),
        ap(area="medium"),
        ap(area="large"),
        ar(1),
        ar(10),
        ar(100),
        ar(area="small"),
        ar(area="medium"),
        ar(area="large"),
    ]
    return dict(zip(COCO_METRIC_NAMES, values, strict=True))


def per_class_coco(acc: CocoAccumulation, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-category AP (.50:.95, .50, .75) and AR@100 at area "all" (-1 when the category has no ground truth)."""
    out: dict[str, dict[str, float]] = {}
    t75 = int(np.where(IOU_THRESHOLDS == 0.75)[0][0])
    for k, name in enumerate(names):
        p = acc.precision[:, :, k, 0, -1]
        out[name] = {
            "ap": mean_valid(p),
            "ap_50": mean_valid(p[0]),
            "ap_75": mean_valid(p[t75]),
            "ar_100": mean_valid(acc.recall[:, k, 0, -1]),
            "num_gt": int(acc.num_gt[k]),
        }
    return out


def evaluate_coco(
    gt: Instances,
    dt: Instances,
    *,
    num_categories: int,
    iou_type: IouType = "bbox",
    pairs: Pairs | None = None,
    all_max_dets: bool = False,
) -> CocoAccumulation:
    """COCO evaluation (``evaluate`` + ``accumulate`` of pycocotools) of columnar instances.

    Args:
        gt: ground truths (``area`` = annotation area, ``iscrowd``, ``ann_id``; ``rles`` for segm).
        dt: detections (``score``, ``area`` = box or mask area; ``rles`` for segm).
        num_categories: K; categories are indices 0..K-1 in the order of increasing category id.
        iou_type: ``"bbox"`` or ``"segm"``.
        pairs: pairs already formed for these instances (internal re-use).
        all_max_dets: also fill the precision curves of maxDets 1 and 10 (summarize reads only
            their final recall); every array then equals pycocotools' ``eval`` arrays.

    Returns:
        The accumulated precision/recall arrays; :func:`summarize_coco` gives the 12 numbers.
    """
    pairs = pairs or pair_instances(gt, dt, num_categories, iou_type)
    kept, tp, fp = _coco_match(gt, dt, pairs)
    return _accumulate(gt, dt, pairs, num_categories, kept, tp, fp, all_max_dets=all_max_dets)
