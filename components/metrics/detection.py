"""Detection metrics: COCO's 12 numbers (bbox and segm), per-class AP/AR, Pascal VOC AP@0.5.

The lecture: a prediction is a true positive when its IoU with an annotated box exceeds a
threshold, TP and FP are accumulated over decreasing confidence, the area under the resulting
precision-recall curve is the class's *average precision* (AP) and the mean over classes is the
*mean average precision* (mAP), with precision = TP / all detections and recall = TP / all
ground truths.

COCO (:func:`evaluate_coco`) makes this exact in the way ``pycocotools.cocoeval.COCOeval``
does, and this module reproduces its numbers to the last bit (tests check within 1e-9):

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

Pascal VOC AP@0.5 (:func:`evaluate_voc`) follows the VOC devkit (``VOCevaldet.m`` /
``voc_eval.py``): each detection goes to the ground truth of highest IoU; IoU > 0.5 and that
ground truth not yet taken makes a TP; ``difficult`` objects are neither counted nor penalised;
AP is the 11-point interpolation (VOC2007) or the area under the monotone precision envelope at
every recall change (all-point, VOC2010+). Boxes here are continuous pixel coordinates, so the
devkit's ``+1`` on integer pixel indices is not applied, and crowd regions count as difficult.

The streaming :class:`DetectionEvaluator` (``reset / update(preds, targets) / compute``) takes
the project's detection contract and is what training stages call; ground truth comes through
``update``, never from a dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from components.errors import EvaluationError
from components.metrics.overlaps import RLE, encode_masks, paired_box_iou, rle_area, rle_iou, xyxy_to_xywh

IouType = Literal["bbox", "segm"]

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


# --------------------------------------------------------------------------- pairing


@dataclass
class _Pairs:
    """Detections sorted by (image, category, score desc), their rank, and all same-group ground-truth pairs."""

    det_order: np.ndarray  # [D] indices into the detection Instances, group-sorted
    det_group: np.ndarray  # [D] image * K + category of each sorted detection
    det_rank: np.ndarray  # [D] rank of the detection by score within its (image, category)
    gt_order: np.ndarray  # [G] indices into the ground-truth Instances, group-sorted, file order kept
    pair_det: np.ndarray  # [P] sorted-detection index of each pair
    pair_gt: np.ndarray  # [P] sorted-ground-truth index of each pair
    iou: np.ndarray  # [P] COCO IoU (crowd: intersection / detection area)


def _segment_starts(keys: np.ndarray) -> np.ndarray:
    """Start position of each element's run of equal consecutive ``keys``."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return np.repeat(change, np.diff(np.r_[change, n]))


def _pair(gt: Instances, dt: Instances, num_categories: int, iou_type: IouType) -> _Pairs:
    """Sort detections and ground truths by (image, category) and form every same-group pair with its IoU.

    Detections are ordered by decreasing score inside a group with a stable sort (pycocotools'
    ``argsort(-score, kind="mergesort")``); ground truths keep their file order.
    """
    K = num_categories
    det_order = np.lexsort((np.arange(len(dt)), -dt.score, dt.category, dt.image))
    det_group = dt.image[det_order] * K + dt.category[det_order]
    det_rank = np.arange(len(dt)) - _segment_starts(det_group)
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
    return _Pairs(det_order, det_group, det_rank, gt_order, pair_det, pair_gt, iou)


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


# --------------------------------------------------------------------------- COCO


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


def _coco_match(gt: Instances, dt: Instances, pairs: _Pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    cand_rank_of[cand_det] = np.arange(len(cand_det)) - _segment_starts(pairs.det_group[cand_det])

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
    pairs: _Pairs,
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


def _mean_valid(s: np.ndarray) -> float:
    valid = s[s > -1]
    return -1.0 if len(valid) == 0 else float(np.mean(valid))


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
        return _mean_valid(s[:, :, :, [areas.index(area)], [m100]])

    def ar(max_det: int = 100, area: str = "all") -> float:
        return _mean_valid(acc.recall[:, :, [areas.index(area)], [MAX_DETECTIONS.index(max_det)]])

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
            "ap": _mean_valid(p),
            "ap_50": _mean_valid(p[0]),
            "ap_75": _mean_valid(p[t75]),
            "ar_100": _mean_valid(acc.recall[:, k, 0, -1]),
            "num_gt": int(acc.num_gt[k]),
        }
    return out


def evaluate_coco(
    gt: Instances,
    dt: Instances,
    *,
    num_categories: int,
    iou_type: IouType = "bbox",
    pairs: _Pairs | None = None,
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
    pairs = pairs or _pair(gt, dt, num_categories, iou_type)
    kept, tp, fp = _coco_match(gt, dt, pairs)
    return _accumulate(gt, dt, pairs, num_categories, kept, tp, fp, all_max_dets=all_max_dets)


# --------------------------------------------------------------------------- Pascal VOC


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
    pairs: _Pairs | None = None,
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
    pairs = pairs or _pair(gt, dt, num_categories, "bbox")
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
        "map_50": _mean_valid(np.array(ap_all)),
        "map_50_11point": _mean_valid(np.array(ap_11)),
        "per_class_ap": ap_all,
        "per_class_ap_11point": ap_11,
        "num_gt": npos.tolist(),
    }


# --------------------------------------------------------------------------- confusion matrix


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


# --------------------------------------------------------------------------- streaming evaluator


def _to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if dtype is not None and str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


@dataclass
class DetectionEvaluator:
    """Accumulating COCO + VOC evaluator: ``reset()``, ``update(preds, targets)``, ``compute()``.

    Args:
        categories: the class names of labels 1..K, or K (names become ``"1".."K"``).
        iou_type: ``"bbox"`` (boxes) or ``"segm"`` (masks; preds and targets then carry ``masks``).
        mask_threshold: predicted mask probabilities at or above this are foreground.

    ``update`` takes the detection contract: ``preds`` a list of ``{boxes (Tensor[N, 4] xyxy
    pixels), scores (Tensor[N]), labels (Tensor[N] int 1..K), [masks (Tensor[N, 1, H, W]
    probabilities or Tensor[N, H, W] binary)]}`` and ``targets`` a list of ``{boxes, labels,
    [iscrowd], [difficult], [area], [masks (Tensor[N, H, W])], [image_id]}``, one per image.
    Boxes are converted to COCO xywh once (``w = x2 - x1``), so the numbers equal pycocotools'
    on the COCO files of the same boxes (see :meth:`to_coco`).
    """

    categories: list[str] | int
    iou_type: IouType = "bbox"
    mask_threshold: float = 0.5
    names: list[str] = field(init=False)
    _gt: list[Instances] = field(init=False, default_factory=list, repr=False)
    _dt: list[Instances] = field(init=False, default_factory=list, repr=False)
    _image_ids: list[int] = field(init=False, default_factory=list, repr=False)
    _image_sizes: list[tuple[int, int]] = field(init=False, default_factory=list, repr=False)
    _seen: set[int] = field(init=False, default_factory=set, repr=False)
    _acc: CocoAccumulation | None = field(init=False, default=None, repr=False)
    category_ids: list[int] = field(init=False, default_factory=list)
    n_unknown_category: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.iou_type not in ("bbox", "segm"):
            raise EvaluationError(
                f"unknown iou_type {self.iou_type!r}", record="iou_type", fix="use 'bbox' or 'segm'"
            )
        if isinstance(self.categories, int):
            self.names = [str(k) for k in range(1, self.categories + 1)]
        else:
            self.names = [str(c) for c in self.categories]
        self.category_ids = list(range(1, len(self.names) + 1))
        if not self.names:
            raise EvaluationError(
                "no categories", record="categories", fix="pass the class names of labels 1..K"
            )

    @classmethod
    def from_coco(
        cls,
        gt: Mapping[str, Any],
        results: list[Mapping[str, Any]],
        *,
        iou_type: IouType = "bbox",
        gt_file: Any = None,
        pred_file: Any = None,
    ) -> DetectionEvaluator:
        """An evaluator loaded with a COCO ground-truth dict and a COCO results list (as ``COCO.loadRes`` takes).

        Category names come from the ground truth, in increasing category id; detections of
        categories absent from it are ignored, as pycocotools does (``n_unknown_category``).

        Raises:
            EvaluationError: naming the bad record of either input.
        """
        from components.metrics.coco_files import load_ground_truth, load_results

        truth = load_ground_truth(gt, iou_type=iou_type, file=gt_file)
        dets, n_unknown = load_results(results, truth, iou_type=iou_type, file=pred_file)
        ev = cls(truth.names, iou_type=iou_type)
        ev.category_ids = truth.category_ids
        ev.n_unknown_category = n_unknown
        ev._image_ids = list(truth.image_ids)
        ev._image_sizes = list(truth.image_sizes)
        ev._seen = set(truth.image_ids)
        ev._gt = [truth.instances]
        ev._dt = [dets]
        return ev

    @property
    def num_categories(self) -> int:
        return len(self.names)

    def reset(self) -> None:
        """Forget every image seen."""
        self._gt, self._dt, self._image_ids, self._image_sizes = [], [], [], []
        self._seen = set()
        self._acc = None

    def update(self, preds: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> None:
        """Add one batch of predictions and their targets (same length, one entry per image)."""
        if len(preds) != len(targets):
            raise EvaluationError(
                f"{len(preds)} predictions for {len(targets)} targets",
                record="update",
                fix="pass one prediction per image",
            )
        self._acc = None
        for pred, target in zip(preds, targets, strict=True):
            image_id = (
                int(_to_numpy(target["image_id"]).reshape(-1)[0])
                if "image_id" in target
                else len(self._image_ids)
            )
            while "image_id" not in target and image_id in self._seen:
                image_id += 1
            if image_id in self._seen:
                raise EvaluationError(
                    "image seen twice",
                    record=f"image_id {image_id}",
                    fix="call reset() between evaluations; ids must be unique",
                )
            self._seen.add(image_id)
            index = len(self._image_ids)
            self._image_ids.append(image_id)
            gt = self._instances(target, index, image_id, is_pred=False)
            gt.ann_id = gt.ann_id + sum(len(g) for g in self._gt)  # unique over the whole set
            dt = self._instances(pred, index, image_id, is_pred=True)
            rles = (gt.rles or []) + (dt.rles or [])
            if len({tuple(r["size"]) for r in rles}) > 1:
                raise EvaluationError(
                    f"mask sizes differ within the image: {sorted({tuple(r['size']) for r in rles})}",
                    record=f"image_id {image_id}",
                    fix="predict masks at the target's size (paste them back into the full image)",
                )
            self._image_sizes.append(tuple(rles[0]["size"]) if rles else (0, 0))
            self._gt.append(gt)
            self._dt.append(dt)

    def _instances(self, d: Mapping[str, Any], index: int, image_id: int, *, is_pred: bool) -> Instances:
        what = "prediction" if is_pred else "target"
        record = f"{what} of image_id {image_id}"
        for key in ("boxes", "labels") + (("scores",) if is_pred else ()):
            if key not in d:
                raise EvaluationError(
                    f"missing {key!r}",
                    record=record,
                    fix=f"a {what} holds boxes, labels" + (", scores" if is_pred else ""),
                )
        boxes = _to_numpy(d["boxes"], np.float64)
        if boxes.size and (boxes.ndim != 2 or boxes.shape[1] != 4):
            raise EvaluationError(
                f"boxes of shape {boxes.shape}", record=record, fix="boxes are Tensor[N, 4] xyxy pixels"
            )
        boxes = boxes.reshape(-1, 4)
        labels = _to_numpy(d["labels"]).reshape(-1).astype(np.int64)
        n = len(boxes)
        if len(labels) != n:
            raise EvaluationError(
                f"{n} boxes but {len(labels)} labels", record=record, fix="one label per box"
            )
        if n and (labels.min() < 1 or labels.max() > self.num_categories):
            raise EvaluationError(
                f"label {int(labels.min() if labels.min() < 1 else labels.max())} outside 1..{self.num_categories}",
                record=record,
                fix="labels are 1..K (0 is background and never a detection)",
            )
        if not np.isfinite(boxes).all():
            raise EvaluationError(
                "non-finite box coordinates", record=record, fix="drop NaN/inf boxes before evaluation"
            )
        bbox = xyxy_to_xywh(boxes)
        score = np.zeros(n)
        if is_pred:
            score = _to_numpy(d["scores"], np.float64).reshape(-1)
            if len(score) != n:
                raise EvaluationError(
                    f"{n} boxes but {len(score)} scores", record=record, fix="one score per box"
                )
            if not np.isfinite(score).all():
                raise EvaluationError("NaN or infinite score", record=record, fix="check the model's outputs")
        rles: list[RLE] | None = None
        if self.iou_type == "segm":
            if "masks" not in d:
                raise EvaluationError(
                    "missing 'masks' for segm evaluation",
                    record=record,
                    fix="pass masks or use iou_type='bbox'",
                )
            masks = _to_numpy(d["masks"])
            if masks.ndim == 4:
                masks = masks[:, 0]
            masks = masks.reshape(n, *masks.shape[-2:]) if n else masks.reshape(0, *masks.shape[-2:])
            binary = masks >= self.mask_threshold if masks.dtype.kind == "f" else masks != 0
            rles = encode_masks(binary)
        if is_pred:
            area = rle_area(rles) if rles is not None else bbox[:, 2] * bbox[:, 3]
        elif "area" in d:
            area = _to_numpy(d["area"], np.float64).reshape(-1)
        else:
            area = rle_area(rles) if rles is not None else bbox[:, 2] * bbox[:, 3]
        flags = {}
        for key in ("iscrowd", "difficult"):
            flags[key] = (
                _to_numpy(d[key]).reshape(-1).astype(bool)
                if (not is_pred and key in d)
                else np.zeros(n, bool)
            )
            if len(flags[key]) != n:
                raise EvaluationError(
                    f"{n} boxes but {len(flags[key])} {key} flags",
                    record=record,
                    fix=f"one {key} flag per box",
                )
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

    def _columns(self) -> tuple[Instances, Instances]:
        """All instances seen, with ``image`` re-indexed by increasing image id.

        pycocotools walks images in id order, and that order breaks ties between equal scores
        of different images; images may arrive in any order (a shuffled loader), so they are
        ranked by id here.
        """
        masks = self.iou_type == "segm"
        gt, dt = Instances.concatenate(self._gt, masks), Instances.concatenate(self._dt, masks)
        ids = np.asarray(self._image_ids, dtype=np.int64)
        if len(ids) > 1 and np.any(ids[1:] < ids[:-1]):
            rank = np.empty(len(ids), dtype=np.int64)
            rank[np.argsort(ids, kind="stable")] = np.arange(len(ids))
            gt.image, dt.image = rank[gt.image], rank[dt.image]
        return gt, dt

    def compute(self) -> dict[str, dict[str, Any]]:
        """COCO's 12 numbers, per-class AP/AR and VOC AP@0.5 of everything seen since ``reset()``.

        Returns:
            ``{iou_type: {map, map_50, ..., mar_large, "per_class": {name: {ap, ap_50, ap_75,
            ar_100, num_gt, voc_ap_50, voc_ap_50_11point}}, "voc": {map_50, map_50_11point}}}``.
        """
        gt, dt = self._columns()
        return self._compute(gt, dt)

    def _compute(self, gt: Instances, dt: Instances) -> dict[str, dict[str, Any]]:
        K = self.num_categories
        pairs = _pair(gt, dt, K, self.iou_type)
        self._acc = evaluate_coco(gt, dt, num_categories=K, iou_type=self.iou_type, pairs=pairs)
        result: dict[str, Any] = summarize_coco(self._acc)
        voc = evaluate_voc(gt, dt, num_categories=K, pairs=pairs)
        per_class = per_class_coco(self._acc, self.names)
        for k, name in enumerate(self.names):
            per_class[name]["voc_ap_50"] = voc["per_class_ap"][k]
            per_class[name]["voc_ap_50_11point"] = voc["per_class_ap_11point"][k]
        result["per_class"] = per_class
        result["voc"] = {"map_50": voc["map_50"], "map_50_11point": voc["map_50_11point"]}
        return {self.iou_type: result}

    def pr_curves(self, iou_thresholds: Sequence[float] = (0.5, 0.75)) -> list[dict[str, Any]]:
        """Interpolated precision-recall curves per class (area "all", 100 detections), from the last ``compute()``.

        Returns:
            One record per (class, IoU threshold): ``{"class", "iou", "recall": [101], "precision": [101]}``;
            classes without ground truth are left out.
        """
        if self._acc is None:
            self.compute()
        assert self._acc is not None
        curves = []
        for thr in iou_thresholds:
            t = np.flatnonzero(np.isclose(IOU_THRESHOLDS, thr))
            if len(t) == 0:
                raise EvaluationError(
                    f"no IoU threshold {thr}",
                    record="pr_iou_thresholds",
                    fix=f"use one of {np.round(IOU_THRESHOLDS, 2).tolist()}",
                )
            for k, name in enumerate(self.names):
                p = self._acc.precision[t[0], :, k, 0, -1]
                if (p < 0).all():
                    continue
                curves.append(
                    {
                        "class": name,
                        "iou": float(thr),
                        "recall": RECALL_THRESHOLDS.tolist(),
                        "precision": p.tolist(),
                    }
                )
        return curves

    def confusion_matrix(self, *, iou_threshold: float = 0.5, score_threshold: float = 0.25) -> np.ndarray:
        """See :func:`detection_confusion_matrix`; ``[K + 1, K + 1]``, last row/column background."""
        gt, dt = self._columns()
        return detection_confusion_matrix(
            gt,
            dt,
            num_categories=self.num_categories,
            iou_threshold=iou_threshold,
            score_threshold=score_threshold,
        )

    def to_coco(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The seen targets and predictions as a COCO ground-truth dict and results list (for pycocotools)."""
        gt, dt = self._columns()
        order = np.argsort(np.asarray(self._image_ids, dtype=np.int64), kind="stable")
        image_ids = [self._image_ids[i] for i in order]  # the order of _columns()' image indices
        images = [
            {
                "id": self._image_ids[i],
                "height": int(self._image_sizes[i][0]),
                "width": int(self._image_sizes[i][1]),
            }
            for i in order
        ]
        cats = [{"id": c, "name": n} for c, n in zip(self.category_ids, self.names, strict=True)]
        anns = []
        for j in range(len(gt)):
            a = {
                "id": int(gt.ann_id[j]),
                "image_id": image_ids[gt.image[j]],
                "category_id": self.category_ids[gt.category[j]],
                "bbox": gt.bbox[j].tolist(),
                "area": float(gt.area[j]),
                "iscrowd": int(gt.iscrowd[j]),
                "difficult": int(gt.difficult[j]),
            }
            if gt.rles is not None:
                a["segmentation"] = gt.rles[j]
            anns.append(a)
        results = []
        for j in range(len(dt)):
            r = {
                "image_id": image_ids[dt.image[j]],
                "category_id": self.category_ids[dt.category[j]],
                "score": float(dt.score[j]),
            }
            if dt.rles is not None:
                r["segmentation"] = dt.rles[j]
            else:
                r["bbox"] = dt.bbox[j].tolist()
            results.append(r)
        return {"images": images, "annotations": anns, "categories": cats}, results
