"""Detection metrics against their references: pycocotools (COCO, bit-exact), the VOC devkit, hand-computed cases."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from components.errors import EvaluationError
from components.metrics.coco import COCO_METRIC_NAMES, evaluate_coco
from components.metrics.coco_files import load_coco_evaluator
from components.metrics.detection import DetectionEvaluator
from components.metrics.voc import evaluate_voc, voc_ap

# --------------------------------------------------------------------------- random COCO cases


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def make_case(
    seed: int,
    *,
    n_images: int = 8,
    n_cats: int = 4,
    segm: bool = False,
    max_gt: int = 6,
    max_dt: int = 30,
    size: tuple[int, int] = (64, 80),
    tie_fraction: float = 0.5,
) -> tuple[dict, list[dict]]:
    """A COCO ground truth and results list with the hard parts of COCO evaluation.

    Empty images, a category with detections but never ground truth (the last), crowd regions,
    images with 130 detections (> maxDets 100), tied scores (rounded to 0.1), tiny and huge
    boxes, annotation areas that differ from the box area (area ranges use the annotation's),
    non-contiguous image and category ids, and masks that are not boxes.
    """
    rng = np.random.default_rng(seed)
    H, W = size
    images = [{"id": int(i * 3 + 1), "height": H, "width": W} for i in range(n_images)]
    cats = [{"id": int(c * 2 + 1), "name": f"c{c}"} for c in range(n_cats)]
    anns: list[dict] = []
    res: list[dict] = []

    def rand_box() -> list[float]:
        kind = rng.integers(0, 4)
        if kind == 0:
            w, h = rng.uniform(0.5, 6, 2)
        elif kind == 1:
            w, h = rng.uniform(W * 0.5, W * 1.2), rng.uniform(H * 0.5, H * 1.2)
        else:
            w, h = rng.uniform(5, 40, 2)
        return [float(rng.uniform(-5, W - 2)), float(rng.uniform(-5, H - 2)), float(w), float(h)]

    def box_mask(b: list[float]) -> np.ndarray:
        m = np.zeros((H, W), np.uint8)
        x, y, w, h = b
        x0, y0 = int(max(0, np.floor(x))), int(max(0, np.floor(y)))
        x1, y1 = int(min(W, np.ceil(x + w))), int(min(H, np.ceil(y + h)))
        m[y0:y1, x0:x1] = 1
        if rng.random() < 0.5 and y1 > y0 and x1 > x0:
            m[y0 + (y1 - y0) // 2 :, x0 : x0 + (x1 - x0) // 2] = 0
        return m

    for img in images:
        gts = []
        if rng.random() >= 0.15:
            for _ in range(rng.integers(0, max_gt + 1)):
                b = rand_box()
                a = {
                    "id": len(anns) + 1,
                    "image_id": img["id"],
                    "category_id": cats[rng.integers(0, n_cats - 1)]["id"],
                    "bbox": b,
                    "iscrowd": int(rng.random() < 0.1),
                }
                if segm:
                    a["segmentation"] = _rle(box_mask(b))
                    a["area"] = (
                        float(mask_utils.area(a["segmentation"]))
                        if rng.random() < 0.8
                        else float(rng.uniform(0, 1e4))
                    )
                else:
                    a["area"] = b[2] * b[3] if rng.random() < 0.7 else float(rng.uniform(0, 120 * 120))
                anns.append(a)
                gts.append(a)
        n_dt = 130 if rng.random() < 0.1 else int(rng.integers(0, max_dt + 1))
        for _ in range(n_dt):
            if gts and rng.random() < 0.6:
                g = gts[rng.integers(len(gts))]
                b = [v + rng.normal(0, 3) for v in g["bbox"][:2]] + [
                    max(0.1, v * rng.uniform(0.7, 1.3)) for v in g["bbox"][2:]
                ]
                c = g["category_id"] if rng.random() < 0.85 else cats[rng.integers(n_cats)]["id"]
            else:
                b, c = rand_box(), cats[rng.integers(n_cats)]["id"]
            score = float(np.round(rng.random(), 1)) if rng.random() < tie_fraction else float(rng.random())
            r = {"image_id": img["id"], "category_id": c, "score": score}
            if segm:
                r["segmentation"] = _rle(box_mask(b))
            else:
                r["bbox"] = [float(v) for v in b]
            res.append(r)
    return {"images": images, "annotations": anns, "categories": cats}, res


def pycocotools_eval(gt: dict, res: list[dict], iou_type: str) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(res))
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def assert_same_as_pycocotools(gt: dict, res: list[dict], iou_type: str) -> dict:
    ref = pycocotools_eval(gt, res, iou_type)
    ev = load_coco_evaluator(gt, res, iou_type=iou_type)[0]
    out = ev.compute()[iou_type]
    ours = np.array([out[k] for k in COCO_METRIC_NAMES])
    np.testing.assert_allclose(ours, ref.stats, rtol=0, atol=1e-9)
    # the whole accumulation, every maxDets slot included, equals pycocotools' arrays
    acc = evaluate_coco(
        *ev._columns(), num_categories=ev.num_categories, iou_type=iou_type, all_max_dets=True
    )
    np.testing.assert_allclose(acc.precision, ref.eval["precision"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(acc.recall, ref.eval["recall"], rtol=0, atol=1e-12)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_bbox_equals_pycocotools(seed):
    gt, res = make_case(seed)
    out = assert_same_as_pycocotools(gt, res, "bbox")
    assert out["per_class"]["c3"]["ap"] == -1  # detections but never ground truth: excluded


@pytest.mark.parametrize("seed", range(5))
def test_segm_equals_pycocotools(seed):
    gt, res = make_case(100 + seed, segm=True, n_images=6)
    assert_same_as_pycocotools(gt, res, "segm")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    n_images=st.integers(1, 10),
    n_cats=st.integers(2, 5),
    max_gt=st.integers(0, 8),
    max_dt=st.integers(0, 40),
    tie_fraction=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_bbox_equals_pycocotools_hypothesis(seed, n_images, n_cats, max_gt, max_dt, tie_fraction):
    gt, res = make_case(
        seed, n_images=n_images, n_cats=n_cats, max_gt=max_gt, max_dt=max_dt, tie_fraction=tie_fraction
    )
    if not res:  # pycocotools' loadRes cannot take an empty list
        return
    assert_same_as_pycocotools(gt, res, "bbox")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n_images=st.integers(1, 5), max_dt=st.integers(1, 25))
def test_segm_equals_pycocotools_hypothesis(seed, n_images, max_dt):
    gt, res = make_case(seed, segm=True, n_images=n_images, max_dt=max_dt, size=(40, 48))
    if not res:
        return
    assert_same_as_pycocotools(gt, res, "segm")


def test_pycocotools_quirks():
    """Ground-truth id 0 reads as 'unmatched'; huge numbers of detections; polygon ground truth."""
    gt, res = make_case(7, n_images=4)
    gt["annotations"][0]["id"] = 0
    assert_same_as_pycocotools(gt, res, "bbox")
    gt, res = make_case(8, n_images=3, max_dt=0)
    img = gt["images"][0]["id"]
    res = [
        {"image_id": img, "category_id": 1, "bbox": [i % 50, i % 40, 10, 12], "score": 0.5}
        for i in range(400)
    ]
    assert_same_as_pycocotools(gt, res, "bbox")
    poly = {"images": [{"id": 1, "height": 50, "width": 60}], "categories": [{"id": 1, "name": "a"}]}
    poly["annotations"] = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "segmentation": [[5, 5, 30, 5, 30, 40, 5, 40]],
            "area": 875.0,
            "bbox": [5, 5, 25, 35],
            "iscrowd": 0,
        }
    ]
    m = np.zeros((50, 60), np.uint8)
    m[6:38, 4:29] = 1
    res = [{"image_id": 1, "category_id": 1, "segmentation": _rle(m), "score": 0.9}]
    assert_same_as_pycocotools(poly, res, "segm")
    # results carrying both a box and a mask (detectron2's format): loadRes takes the *box* area
    # for the area ranges, even in segm evaluation
    gt, res = make_case(31, segm=True, n_images=5)
    rng = np.random.default_rng(0)
    for r in res:
        x, y, w, h = mask_utils.toBbox(r["segmentation"]).tolist()
        r["bbox"] = [x, y, w * rng.uniform(0.5, 3), h * rng.uniform(0.5, 3)]
    assert_same_as_pycocotools(gt, res, "segm")
    assert_same_as_pycocotools(gt, res, "bbox")


def test_no_ground_truth_and_no_detections():
    gt, _ = make_case(3, max_gt=0)
    ev = load_coco_evaluator(gt, [])[0]
    out = ev.compute()["bbox"]
    assert all(out[k] == -1 for k in COCO_METRIC_NAMES)
    gt, _ = make_case(4)
    out = load_coco_evaluator(gt, [])[0].compute()["bbox"]
    assert out["map"] == 0 and out["mar_100"] == 0  # ground truth, nothing found


# --------------------------------------------------------------------------- streaming API


def _case_as_batches(gt: dict, res: list[dict], segm: bool):
    """The same case in the detection contract (torch tensors, xyxy, labels 1..K)."""
    cat_index = {c["id"]: k + 1 for k, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))}
    preds, targets = [], []
    for img in gt["images"]:
        g = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        d = [r for r in res if r["image_id"] == img["id"]]

        def xyxy(items):
            b = torch.tensor([a["bbox"] for a in items], dtype=torch.float64).reshape(-1, 4)
            return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)

        t = {
            "boxes": xyxy(g),
            "labels": torch.tensor([cat_index[a["category_id"]] for a in g], dtype=torch.int64),
            "iscrowd": torch.tensor([a["iscrowd"] for a in g]),
            "area": torch.tensor([a["area"] for a in g], dtype=torch.float64),
            "image_id": img["id"],
        }
        p = {
            "boxes": xyxy(d) if not segm else torch.zeros(len(d), 4),
            "scores": torch.tensor([r["score"] for r in d], dtype=torch.float64),
            "labels": torch.tensor([cat_index[r["category_id"]] for r in d], dtype=torch.int64),
        }
        if segm:
            hw = (img["height"], img["width"])
            t["masks"] = torch.from_numpy(
                np.stack([mask_utils.decode(a["segmentation"]) for a in g])
                if g
                else np.zeros((0, *hw), np.uint8)
            )
            probs = (
                np.stack([mask_utils.decode(r["segmentation"]) for r in d]).astype(np.float32) * 0.9
                if d
                else np.zeros((0, *hw), np.float32)
            )
            p["masks"] = torch.from_numpy(probs)[:, None]  # Mask R-CNN's [N, 1, H, W] probabilities
        targets.append(t)
        preds.append(p)
    return preds, targets


@pytest.mark.parametrize("segm", [False, True])
def test_streaming_update_equals_pycocotools(segm):
    gt, res = make_case(21, segm=segm, n_images=10, tie_fraction=1.0)
    names = [c["name"] for c in gt["categories"]]
    preds, targets = _case_as_batches(gt, res, segm)
    order = np.random.default_rng(0).permutation(len(preds))  # a shuffled loader: ids arrive out of order
    preds, targets = [preds[i] for i in order], [targets[i] for i in order]
    ev = DetectionEvaluator(names, iou_type="segm" if segm else "bbox")
    for i in range(0, len(preds), 4):  # batches of 4 images
        ev.update(preds[i : i + 4], targets[i : i + 4])
    out = ev.compute()[ev.iou_type]
    gt2, res2 = ev.to_coco()
    ref = pycocotools_eval(gt2, res2, ev.iou_type)
    np.testing.assert_allclose([out[k] for k in COCO_METRIC_NAMES], ref.stats, rtol=0, atol=1e-9)
    # the same numbers as the original files (boxes went xywh -> xyxy -> xywh)
    ref0 = pycocotools_eval(gt, res, ev.iou_type)
    np.testing.assert_allclose([out[k] for k in COCO_METRIC_NAMES], ref0.stats, rtol=0, atol=1e-9)
    ev.reset()
    assert ev.compute()[ev.iou_type]["map"] == -1


def test_streaming_errors_name_the_record():
    ev = DetectionEvaluator(["a", "b"])
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1]), "image_id": 5}
    with pytest.raises(EvaluationError, match="image_id 5.*label 0"):
        ev.update(
            [
                {
                    "boxes": torch.tensor([[0.0, 0, 10, 10]]),
                    "scores": torch.tensor([0.5]),
                    "labels": torch.tensor([0]),
                }
            ],
            [target],
        )
    ev.reset()
    with pytest.raises(EvaluationError, match="NaN"):
        ev.update(
            [
                {
                    "boxes": torch.tensor([[0.0, 0, 10, 10]]),
                    "scores": torch.tensor([float("nan")]),
                    "labels": torch.tensor([1]),
                }
            ],
            [target],
        )
    ev.reset()
    with pytest.raises(EvaluationError, match=r"boxes of shape \(1, 5\)"):
        ev.update(
            [
                {
                    "boxes": torch.zeros(1, 5),
                    "scores": torch.ones(1),
                    "labels": torch.ones(1, dtype=torch.int64),
                }
            ],
            [target],
        )
    ev.reset()
    with pytest.raises(EvaluationError, match="missing 'scores'"):
        ev.update([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], [target])


# --------------------------------------------------------------------------- Pascal VOC


def _voc_devkit_reference(
    gt_boxes, gt_difficult, det_image, det_boxes, det_scores, ovthresh=0.5, use_07=False
):
    """One class, transcribed from the VOC devkit's ``voc_eval`` (continuous boxes: no +1)."""
    recs = {
        i: {
            "bbox": np.asarray(b, float).reshape(-1, 4),
            "difficult": np.asarray(d, bool),
            "det": [False] * len(b),
        }
        for i, (b, d) in enumerate(zip(gt_boxes, gt_difficult, strict=True))
    }
    npos = sum(int((~r["difficult"]).sum()) for r in recs.values())
    order = np.argsort(-np.asarray(det_scores), kind="stable")
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for d, k in enumerate(order):
        r, bb = recs[det_image[k]], np.asarray(det_boxes[k], float)
        ovmax, jmax = -np.inf, -1
        g = r["bbox"]
        if g.size:
            iw = np.maximum(np.minimum(g[:, 2], bb[2]) - np.maximum(g[:, 0], bb[0]), 0.0)
            ih = np.maximum(np.minimum(g[:, 3], bb[3]) - np.maximum(g[:, 1], bb[1]), 0.0)
            inters = iw * ih
            uni = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inters
            ov = inters / uni
            ovmax, jmax = ov.max(), int(ov.argmax())
        if ovmax > ovthresh:
            if not r["difficult"][jmax]:
                if not r["det"][jmax]:
                    tp[d], r["det"][jmax] = 1, True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07:
        return sum(
            (np.max(prec[rec >= t]) if np.sum(rec >= t) else 0) / 11.0 for t in np.arange(0.0, 1.1, 0.1)
        )
    mrec, mpre = np.concatenate(([0.0], rec, [1.0])), np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _voc_update(ev, gt_boxes, gt_difficult, det_image, det_boxes, det_scores):
    for i, (b, d) in enumerate(zip(gt_boxes, gt_difficult, strict=True)):
        k = [j for j in range(len(det_image)) if det_image[j] == i]
        ev.update(
            [
                {
                    "boxes": torch.tensor([det_boxes[j] for j in k]).reshape(-1, 4),
                    "scores": torch.tensor([det_scores[j] for j in k]),
                    "labels": torch.ones(len(k), dtype=torch.int64),
                }
            ],
            [
                {
                    "boxes": torch.tensor(b).reshape(-1, 4),
                    "labels": torch.ones(len(b), dtype=torch.int64),
                    "difficult": torch.tensor(d, dtype=torch.bool),
                }
            ],
        )


def test_voc_hand_computed():
    """A TP, a duplicate (FP), a hit on a difficult object (ignored), a miss (FP), a TP; 2 counted objects.

    Precision/recall after each counted detection: (1, .5), (.5, .5), (1/3, .5), (.5, 1).
    All-point: .5 * 1 + .5 * .5 = .75. 11-point: 6 recall points at precision 1, 5 at .5: 8.5 / 11.
    """
    gt_boxes = [[[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]]
    difficult = [[False, False, True]]
    det_boxes = [[0, 0, 10, 10], [0, 0, 10, 9], [40, 40, 50, 50], [60, 60, 70, 70], [20, 20, 30, 31]]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    ev = DetectionEvaluator(["cell"])
    _voc_update(ev, gt_boxes, difficult, [0] * 5, det_boxes, scores)
    voc = ev.compute()["bbox"]["voc"]
    assert voc["map_50"] == pytest.approx(0.75, abs=1e-12)
    assert voc["map_50_11point"] == pytest.approx(8.5 / 11, abs=1e-12)
    assert voc_ap(np.array([0.5, 0.5, 0.5, 1.0]), np.array([1, 0.5, 1 / 3, 0.5])) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(4))
def test_voc_equals_devkit(seed):
    rng = np.random.default_rng(seed)
    gt_boxes, difficult, det_image, det_boxes, det_scores = [], [], [], [], []
    for i in range(6):
        n = int(rng.integers(0, 5))
        xy = rng.uniform(0, 80, (n, 2))
        b = np.c_[xy, xy + rng.uniform(5, 30, (n, 2))]
        gt_boxes.append(b.tolist())
        difficult.append((rng.random(n) < 0.2).tolist())
        for _ in range(int(rng.integers(0, 12))):
            if n and rng.random() < 0.7:
                d = b[rng.integers(n)] + rng.normal(0, 2, 4)
            else:
                xy0 = rng.uniform(0, 80, 2)
                d = np.r_[xy0, xy0 + rng.uniform(5, 30, 2)]
            det_image.append(i)
            det_boxes.append(d.tolist())
            det_scores.append(float(rng.random()))
    if not any(not x for d in difficult for x in d):
        return
    ev = DetectionEvaluator(["cell"])
    _voc_update(ev, gt_boxes, difficult, det_image, det_boxes, det_scores)
    voc = ev.compute()["bbox"]["voc"]
    assert voc["map_50"] == pytest.approx(
        _voc_devkit_reference(gt_boxes, difficult, det_image, det_boxes, det_scores), abs=1e-12
    )
    assert voc["map_50_11point"] == pytest.approx(
        _voc_devkit_reference(gt_boxes, difficult, det_image, det_boxes, det_scores, use_07=True), abs=1e-12
    )


def test_voc_from_coco_difficult_flag():
    gt, res = make_case(5)
    for a in gt["annotations"][::3]:
        a["difficult"] = 1
    ev = load_coco_evaluator(gt, res)[0]
    gtc, dtc = ev._columns()
    voc = evaluate_voc(gtc, dtc, num_categories=ev.num_categories)
    assert voc["num_gt"] == np.bincount(gtc.category[~(gtc.difficult | gtc.iscrowd)], minlength=4).tolist()
    assert voc["per_class_ap"][3] == -1  # no ground truth: excluded from the mean


# --------------------------------------------------------------------------- PR curves and confusion matrix


def test_confusion_matrix_hand_computed():
    ev = DetectionEvaluator(["cat", "dog"])
    target = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]]),
        "labels": torch.tensor([1, 2, 2]),
    }
    pred = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [80, 80, 90, 90], [0, 0, 10, 11]]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.1]),  # the last one is below the score threshold
        "labels": torch.tensor([1, 1, 2, 1]),
    }
    ev.update([pred], [target])
    cm = ev.confusion_matrix(iou_threshold=0.5, score_threshold=0.25)
    expected = np.array(
        [
            [1, 0, 0],  # cat found as cat
            [1, 0, 1],  # one dog called cat, one dog missed
            [0, 1, 0],  # a dog where there is nothing
        ]
    )
    np.testing.assert_array_equal(cm, expected)


def test_pr_curves():
    gt, res = make_case(2)
    ev = load_coco_evaluator(gt, res)[0]
    out = ev.compute()["bbox"]
    curves = ev.pr_curves((0.5, 0.75))
    assert {c["iou"] for c in curves} == {0.5, 0.75}
    c50 = {c["class"]: c for c in curves if c["iou"] == 0.5}
    assert "c3" not in c50  # no ground truth, no curve
    for name, c in c50.items():
        p = np.array(c["precision"])
        assert len(p) == 101 and np.all(np.diff(p) <= 0)  # the interpolated envelope never rises
        assert p.mean() == pytest.approx(out["per_class"][name]["ap_50"], abs=1e-12)
    with pytest.raises(EvaluationError):
        ev.pr_curves((0.42,))


def test_segm_mask_size_mismatch_is_an_error():
    ev = DetectionEvaluator(["a"], iou_type="segm")
    target = {
        "boxes": torch.tensor([[0.0, 0, 4, 4]]),
        "labels": torch.tensor([1]),
        "masks": torch.ones(1, 8, 8, dtype=torch.uint8),
    }
    pred = {
        "boxes": torch.tensor([[0.0, 0, 4, 4]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
        "masks": torch.ones(1, 1, 16, 16),
    }
    with pytest.raises(EvaluationError, match="mask sizes differ"):
        ev.update([pred], [target])


def test_bbox_equals_pycocotools_larger_case():
    gt, res = make_case(99, n_images=60, n_cats=8, max_gt=12, max_dt=80)
    assert_same_as_pycocotools(gt, res, "bbox")
