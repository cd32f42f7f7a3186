"""COCO files in and out of the evaluator: ground truth and results read into columns, every record validated.

Ground truth is a COCO instances dict (``images``, ``annotations``, ``categories``); predictions
are the COCO *results* list (``[{image_id, category_id, score, bbox | segmentation}]``), as
``pycocotools.coco.COCO.loadRes`` takes them. The columns built here hold exactly what
pycocotools evaluates: annotation ``area`` for ground truth; for detections ``w * h`` of the
box when the first result has a ``bbox``, else the mask area (``loadRes``'s rule); polygons and
uncompressed RLE converted with ``pycocotools.mask.frPyObjects`` at the image's size.

A bad record never reaches numpy or pycocotools' C code (where a malformed RLE can read past
its buffer): it raises :class:`~components.errors.EvaluationError` naming the file, the record
(index and id) and the fix.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from components.errors import EvaluationError
from components.io import read_json
from components.metrics.detection import DetectionEvaluator
from components.metrics.instances import Instances, IouType
from components.metrics.overlaps import RLE, rle_area

_RLE_CHARS = re.compile(r"^[0-o]*$")  # pycocotools' compressed counts: chars 48..111


@dataclass
class CocoGroundTruth:
    """A validated COCO ground truth in columns.

    Attributes:
        image_ids: image ids in increasing order (pycocotools evaluates ``np.unique(imgIds)``).
        image_sizes: ``(height, width)`` per image, in ``image_ids`` order (0 when absent).
        category_ids: category ids in increasing order; category index k is ``category_ids[k]``.
        names: category names in the same order.
        instances: the annotations (``image`` and ``category`` as indices into the lists above).
    """

    image_ids: list[int]
    image_sizes: list[tuple[int, int]]
    category_ids: list[int]
    names: list[str]
    instances: Instances


def _fail(message: str, file: Path | str | None, record: str, fix: str) -> EvaluationError:
    return EvaluationError(message, file=file, record=record, fix=fix)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_box(bbox: Any) -> bool:
    return isinstance(bbox, list | tuple) and len(bbox) == 4 and all(_number(v) for v in bbox)


def _rle_counts_total(counts: str) -> int | None:
    """Sum of the run lengths of a compressed RLE string (pycocotools' ``rleFrString``), None if malformed."""
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None  # the last value promises more characters
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
    return sum(runs)


def to_rle(segm: Any, height: int, width: int, *, file: Path | str | None, record: str) -> RLE:
    """One annotation's ``segmentation`` (polygons, uncompressed or compressed RLE) as compressed RLE.

    Same conversion as pycocotools' ``COCO.annToRLE``, after checks that keep malformed input away
    from its C code.
    """
    fix = "segmentation is a list of polygons [[x1, y1, x2, y2, ...]] or RLE {'size': [h, w], 'counts': ...}"
    if isinstance(segm, list):
        if not segm or not all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_number(v) for v in p)
            for p in segm
        ):
            raise _fail("malformed polygon segmentation", file, record, fix)
        if height <= 0 or width <= 0:
            raise _fail(
                "polygons need the image's height and width",
                file,
                record,
                "give the image 'height' and 'width'",
            )
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if not isinstance(segm, Mapping) or "size" not in segm or "counts" not in segm:
        raise _fail("malformed RLE segmentation (needs 'size' and 'counts')", file, record, fix)
    size = segm["size"]
    if not (
        isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) and v >= 0 for v in size)
    ):
        raise _fail(f"malformed RLE size {size!r}", file, record, "size is [height, width]")
    h, w = size
    counts = segm["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != h * w:
            raise _fail(
                "malformed uncompressed RLE: counts must be non-negative and sum to height*width",
                file,
                record,
                fix,
            )
        return mask_utils.frPyObjects(dict(segm), h, w)
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if not isinstance(counts, str) or not _RLE_CHARS.match(counts) or _rle_counts_total(counts) != h * w:
        raise _fail("malformed compressed RLE: its runs do not cover height*width pixels", file, record, fix)
    return {"size": [h, w], "counts": counts}


def load_ground_truth(
    data: Any, *, iou_type: IouType = "bbox", file: Path | str | None = None
) -> CocoGroundTruth:
    """Validate a COCO instances dict and return it in columns.

    Args:
        data: the parsed JSON (``images``, ``annotations``, ``categories``).
        iou_type: ``"segm"`` also requires and converts each annotation's ``segmentation``.
        file: the file the data came from, for messages.

    Raises:
        EvaluationError: naming the first bad record (missing key, unknown image or category id,
            duplicate id, non-finite number, malformed segmentation).
    """
    if not isinstance(data, Mapping):
        raise _fail("ground truth is not a JSON object", file, "top level", "pass a COCO instances file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise _fail(
                f"missing list {key!r}",
                file,
                key,
                "a COCO instances file has images, annotations and categories",
            )
    images = read_gt_images(data["images"], file)
    categories = read_gt_categories(data["categories"], file)
    image_ids = sorted(images)
    category_ids = sorted(categories)
    instances = read_gt_annotations(data["annotations"], images, image_ids, category_ids, iou_type=iou_type, file=file)
    return CocoGroundTruth(
        image_ids,
        [images[i] for i in image_ids],
        category_ids,
        [categories[c] for c in category_ids],
        instances,
    )


def read_gt_images(entries: list[Any], file: Path | str | None) -> dict[int, tuple[int, int]]:
    """``{image id: (height, width)}`` of the ground truth's images (0 where a size is missing).

    Raises:
        EvaluationError: an image without an integer id, or a duplicate id.
    """
    images: dict[int, tuple[int, int]] = {}
    for i, img in enumerate(entries):
        if not isinstance(img, Mapping) or not isinstance(img.get("id"), int):
            raise _fail(
                "image without an integer 'id'", file, f"images[{i}]", "every image has an integer id"
            )
        if img["id"] in images:
            raise _fail(f"duplicate image id {img['id']}", file, f"images[{i}]", "image ids must be unique")
        images[img["id"]] = (int(img.get("height") or 0), int(img.get("width") or 0))
    return images


def read_gt_categories(entries: list[Any], file: Path | str | None) -> dict[int, str]:
    """``{category id: name}`` (the id as name when it has none).

    Raises:
        EvaluationError: a category without an integer id, a duplicate id, or no category at all.
    """
    categories: dict[int, str] = {}
    for i, cat in enumerate(entries):
        if not isinstance(cat, Mapping) or not isinstance(cat.get("id"), int):
            raise _fail(
                "category without an integer 'id'",
                file,
                f"categories[{i}]",
                "every category has an integer id",
            )
        if cat["id"] in categories:
            raise _fail(
                f"duplicate category id {cat['id']}", file, f"categories[{i}]", "category ids must be unique"
            )
        categories[cat["id"]] = str(cat.get("name", cat["id"]))
    if not categories:
        raise _fail("no categories", file, "categories", "list the categories (id, name)")
    return categories


def read_gt_annotations(
    anns: list[Any],
    images: Mapping[int, tuple[int, int]],
    image_ids: list[int],
    category_ids: list[int],
    *,
    iou_type: IouType,
    file: Path | str | None,
) -> Instances:
    """The annotations in columns; image and category are indices into the sorted ``image_ids``/``category_ids``.

    Raises:
        EvaluationError: naming the first bad annotation (see :func:`check_gt_annotation`).
    """
    image_index = {k: i for i, k in enumerate(image_ids)}
    category_index = {k: i for i, k in enumerate(category_ids)}
    n = len(anns)
    img_col = np.zeros(n, dtype=np.int64)
    cat_col = np.zeros(n, dtype=np.int64)
    bbox = np.zeros((n, 4), dtype=np.float64)
    area = np.zeros(n, dtype=np.float64)
    crowd = np.zeros(n, dtype=bool)
    difficult = np.zeros(n, dtype=bool)
    ids = np.zeros(n, dtype=np.int64)
    rles: list[RLE] | None = [] if iou_type == "segm" else None
    seen: set[int] = set()
    for j, a in enumerate(anns):
        record = f"annotations[{j}]" + (f" id {a.get('id')}" if isinstance(a, Mapping) else "")
        check_gt_annotation(a, record, image_index, category_index, seen, file)
        h, w = images[a["image_id"]]
        rle = None
        if rles is not None:
            rle = read_gt_segmentation(a, h, w, record, file)
            rles.append(rle)
        bbox[j] = read_gt_box(a, rle, record, file)
        img_col[j] = image_index[a["image_id"]]
        cat_col[j] = category_index[a["category_id"]]
        area[j] = a["area"]
        crowd[j] = bool(a.get("iscrowd", 0))
        difficult[j] = bool(a.get("difficult", 0))
        ids[j] = a["id"] if isinstance(a["id"], int) else j + 1
    return Instances(img_col, cat_col, bbox, area, np.zeros(n), crowd, difficult, ids, rles)


def check_gt_annotation(
    a: Any,
    record: str,
    image_index: Mapping[int, int],
    category_index: Mapping[int, int],
    seen: set[int],
    file: Path | str | None,
) -> None:
    """Raise EvaluationError unless annotation ``a`` has its keys, a new id, a known image and category, a finite area.

    Adds its id to ``seen``.
    """
    if not isinstance(a, Mapping):
        raise _fail("annotation is not an object", file, record, "each annotation is a JSON object")
    for key in ("id", "image_id", "category_id", "area"):
        if key not in a:
            raise _fail(
                f"missing {key!r}",
                file,
                record,
                "COCO annotations carry id, image_id, category_id, bbox, area, iscrowd",
            )
    for key in ("id", "image_id", "category_id"):
        if not isinstance(a[key], (int, str)) or isinstance(a[key], bool):
            raise _fail(f"{key} {a[key]!r} is not an integer id", file, record, "ids are integers")
    if a["id"] in seen:
        raise _fail(f"duplicate annotation id {a['id']}", file, record, "annotation ids must be unique")
    seen.add(a["id"])
    if a["image_id"] not in image_index:
        raise _fail(
            f"image_id {a['image_id']!r} is not in 'images'",
            file,
            record,
            "add the image or drop the annotation",
        )
    if a["category_id"] not in category_index:
        raise _fail(
            f"category_id {a['category_id']!r} is not in 'categories'",
            file,
            record,
            "add the category or drop the annotation",
        )
    if not _number(a["area"]):
        raise _fail(
            f"area {a['area']!r} is not a finite number", file, record, "area is the object's pixel area"
        )


def read_gt_segmentation(a: Mapping[str, Any], h: int, w: int, record: str, file: Path | str | None) -> RLE:
    """The annotation's mask as an RLE of its ``h x w`` image (``segm`` evaluation requires one)."""
    if "segmentation" not in a:
        raise _fail(
            "missing 'segmentation' for segm evaluation",
            file,
            record,
            "add masks or evaluate with --iou-type bbox",
        )
    return to_rle(a["segmentation"], h, w, file=file, record=record)


def read_gt_box(a: Mapping[str, Any], rle: RLE | None, record: str, file: Path | str | None) -> Any:
    """The annotation's ``[x, y, w, h]`` box; without one, the box of its mask ``rle`` (``segm`` only)."""
    if "bbox" in a:
        if not _check_box(a["bbox"]):
            raise _fail(
                f"malformed bbox {a['bbox']!r}", file, record, "bbox is [x, y, width, height] in pixels"
            )
        return a["bbox"]
    if rle is not None:
        return mask_utils.toBbox(rle)
    raise _fail("missing 'bbox'", file, record, "bbox is [x, y, width, height] in pixels")


def _result_record(j: int, r: Any) -> str:
    if isinstance(r, Mapping) and "image_id" in r:
        return f"results[{j}] image_id {r['image_id']!r}"
    return f"results[{j}]"


def _validate_result(
    j: int,
    r: Any,
    gt_images: Mapping[int, int],
    *,
    iou_type: IouType,
    box_area: bool,
    file: Path | str | None,
) -> None:
    """Raise EvaluationError if result ``j`` cannot be evaluated (the slow path that names the record)."""
    record = _result_record(j, r)
    fix = "each result is {image_id, category_id, score, bbox: [x, y, w, h]} (segm: segmentation RLE)"
    if not isinstance(r, Mapping):
        raise _fail("result is not an object", file, record, fix)
    for key in ("image_id", "category_id", "score"):
        if key not in r:
            raise _fail(f"missing {key!r}", file, record, fix)
    for key in ("image_id", "category_id"):
        if not isinstance(r[key], (int, str)) or isinstance(r[key], bool):
            raise _fail(f"{key} {r[key]!r} is not an integer id", file, record, fix)
    if r["image_id"] not in gt_images:
        raise _fail(
            f"image_id {r['image_id']!r} is not in the ground truth",
            file,
            record,
            "predict on the ground truth's images only",
        )
    if not isinstance(r["category_id"], int) or isinstance(r["category_id"], bool):
        raise _fail(f"category_id {r['category_id']!r} is not an integer", file, record, fix)
    if not _number(r["score"]):
        raise _fail(
            f"score {r['score']!r} is not a finite number",
            file,
            record,
            "scores are finite floats (drop NaN detections)",
        )
    if box_area or iou_type == "bbox" and "segmentation" not in r:
        if "bbox" not in r:
            raise _fail("missing 'bbox'", file, record, fix)
    if "bbox" in r and not _check_box(r["bbox"]):
        raise _fail(
            f"malformed bbox {r['bbox']!r}", file, record, "bbox is [x, y, width, height] of finite numbers"
        )
    if iou_type == "segm" and "segmentation" not in r and "bbox" not in r:
        raise _fail("missing 'segmentation'", file, record, fix)


def load_results(
    results: Any, gt: CocoGroundTruth, *, iou_type: IouType = "bbox", file: Path | str | None = None
) -> tuple[Instances, int]:
    """Validate a COCO results list against its ground truth and return it in columns.

    Box results take a vectorised path (one pass per column, then array checks); any failure
    there re-reads the results one by one to name the first bad record.

    Args:
        results: ``[{image_id, category_id, score, bbox | segmentation}]``.
        gt: the ground truth (image ids must belong to it).
        iou_type: ``"segm"`` converts each result's ``segmentation`` (RLE or polygons; a box
            result without one gets its rectangle, as ``loadRes`` does).
        file: the file the results came from, for messages.

    Returns:
        ``(detections, n_unknown)``: detections of categories absent from the ground truth are
        dropped and counted, as pycocotools never evaluates them.

    Raises:
        EvaluationError: naming the first bad result (missing key, image id absent from the
            ground truth, NaN score, malformed box or RLE).
    """
    if not isinstance(results, list):
        raise _fail(
            "results are not a JSON list",
            file,
            "top level",
            "pass the COCO results list [{image_id, category_id, bbox, score}]",
        )
    n = len(results)
    gt_images = {k: i for i, k in enumerate(gt.image_ids)}
    # loadRes: the first result decides whether a detection's area is its box's or its mask's.
    box_area = n > 0 and isinstance(results[0], Mapping) and bool(results[0].get("bbox"))
    use_boxes = iou_type == "bbox" and box_area
    checks = {"gt_images": gt_images, "iou_type": iou_type, "box_area": box_area, "file": file}
    image_id, category_id, score, bbox = read_result_columns(results, use_boxes=use_boxes, checks=checks)
    image, category, keep = check_result_ids(results, gt, image_id, category_id, score, bbox, checks=checks)
    rles: list[RLE] | None = None
    if bbox is not None:
        area = bbox[:, 2] * bbox[:, 3]
    else:
        check_results_one_by_one(results, **checks)
        bbox, area, rles = read_result_masks(results, gt, image, box_area=box_area, file=file)
    idx = np.flatnonzero(keep)
    dets = Instances(
        image=image[idx].astype(np.int64),
        category=category[idx].astype(np.int64),
        bbox=bbox[idx],
        area=area[idx],
        score=score[idx],
        iscrowd=np.zeros(len(idx), bool),
        difficult=np.zeros(len(idx), bool),
        ann_id=idx.astype(np.int64) + 1,
        rles=[rles[i] for i in idx] if (rles is not None and iou_type == "segm") else None,
    )
    return dets, int(n - len(idx))


def check_results_one_by_one(
    results: list[Any], *, gt_images: Mapping[int, int], iou_type: IouType, box_area: bool, file: Path | str | None
) -> None:
    """The slow path: validate each result in turn, raising EvaluationError at the first bad one."""
    for j, r in enumerate(results):
        _validate_result(j, r, gt_images, iou_type=iou_type, box_area=box_area, file=file)


def read_result_columns(
    results: list[Any], *, use_boxes: bool, checks: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(image_id, category_id, score, bbox or None)`` columns, read in one pass each (bbox only for box results).

    Raises:
        EvaluationError: a result cannot be read; the slow path names it.
    """
    n = len(results)
    bbox = None
    try:
        image_id = np.fromiter((r["image_id"] for r in results), dtype=np.int64, count=n)
        category_id = np.fromiter((r["category_id"] for r in results), dtype=np.int64, count=n)
        score = np.fromiter((r["score"] for r in results), dtype=np.float64, count=n)
        if use_boxes:
            bbox = np.array([r["bbox"] for r in results], dtype=np.float64).reshape(n, 4)
    except (KeyError, TypeError, ValueError, OverflowError):
        check_results_one_by_one(results, **checks)
        raise _fail(
            "unreadable results", checks["file"], "results", "each result is {image_id, category_id, score, bbox}"
        ) from None
    return image_id, category_id, score, bbox


def check_result_ids(
    results: list[Any],
    gt: CocoGroundTruth,
    image_id: np.ndarray,
    category_id: np.ndarray,
    score: np.ndarray,
    bbox: np.ndarray | None,
    *,
    checks: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map result ids to ground-truth indices: ``(image index, category index, keep)``.

    ``keep`` is False for results of categories the ground truth lacks (dropped, as pycocotools
    does). Vectorised; on the first bad row (unknown image, non-finite score or box) the slow
    check of that row names it.

    Raises:
        EvaluationError: a result's image is not in the ground truth, or its score or box is not finite.
    """
    n = len(results)
    ids = np.asarray(gt.image_ids, dtype=np.int64)
    image = np.searchsorted(ids, image_id).clip(max=max(len(ids) - 1, 0))
    cats = np.asarray(gt.category_ids, dtype=np.int64)
    category = np.searchsorted(cats, category_id).clip(max=len(cats) - 1)
    bad = ~np.isfinite(score) | (ids[image] != image_id if len(ids) else np.ones(n, bool))
    if bbox is not None:
        bad |= ~np.isfinite(bbox).all(axis=1)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        _validate_result(j, results[j], **checks)
        raise _fail("invalid result", checks["file"], _result_record(j, results[j]), "check image_id, score and bbox")
    keep = cats[category] == category_id
    return image, category, keep


def read_result_masks(
    results: list[Any], gt: CocoGroundTruth, image: np.ndarray, *, box_area: bool, file: Path | str | None
) -> tuple[np.ndarray, np.ndarray, list[RLE]]:
    """``(bbox, area, rles)`` of mask results; a box result's mask is its rectangle (``loadRes``).

    The area is the box's when the first result had a box (``box_area``), else the mask's.
    """
    n = len(results)
    bbox = np.zeros((n, 4), dtype=np.float64)
    rles: list[RLE] = []
    for j, r in enumerate(results):
        h, w = gt.image_sizes[image[j]]
        segm = r.get("segmentation")
        if segm is None:  # a box result's segmentation is its rectangle (loadRes)
            x, y, bw, bh = r["bbox"]
            segm = [[x, y, x, y + bh, x + bw, y + bh, x + bw, y]]
        rles.append(to_rle(segm, h, w, file=file, record=_result_record(j, r)))
        bbox[j] = r["bbox"] if "bbox" in r else mask_utils.toBbox(rles[-1])
    area = bbox[:, 2] * bbox[:, 3] if box_area else rle_area(rles)
    return bbox, area, rles


def read_user_json(path: Path, what: str) -> Any:
    """Parse a user's JSON file, raising EvaluationError (not a traceback) when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise _fail(f"{what} file not found", path, what, f"pass an existing {what} JSON file")
    try:
        return read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(f"not valid JSON: {err}", path, what, f"pass a valid {what} JSON file") from None


def load_coco_evaluator(
    gt: Mapping[str, Any],
    results: list[Mapping[str, Any]],
    *,
    iou_type: IouType = "bbox",
    gt_file: Path | str | None = None,
    pred_file: Path | str | None = None,
) -> tuple[DetectionEvaluator, int]:
    """An evaluator loaded with a COCO ground-truth dict and a COCO results list (as ``COCO.loadRes`` takes).

    Category names come from the ground truth, in increasing category id; detections of
    categories absent from it are ignored, as pycocotools does.

    Args:
        gt: the parsed ground-truth file.
        results: the parsed results file.
        iou_type: ``"bbox"`` or ``"segm"``.
        gt_file, pred_file: where they came from, for messages.

    Returns:
        ``(evaluator, n_unknown_category)``: the number of detections of unknown categories dropped.

    Raises:
        EvaluationError: naming the bad record of either input.
    """
    truth = load_ground_truth(gt, iou_type=iou_type, file=gt_file)
    dets, n_unknown = load_results(results, truth, iou_type=iou_type, file=pred_file)
    evaluator = DetectionEvaluator.from_instances(
        truth.names,
        truth.instances,
        dets,
        image_ids=truth.image_ids,
        image_sizes=truth.image_sizes,
        category_ids=truth.category_ids,
        iou_type=iou_type,
    )
    return evaluator, n_unknown
