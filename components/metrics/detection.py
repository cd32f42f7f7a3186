"""The streaming detection evaluator: ``reset() / update(preds, targets) / compute()``.

:class:`DetectionEvaluator` takes the project's detection contract (see
:mod:`components.metrics.instances`) and is what training stages call; ground truth comes
through ``update``, never from a dataset (detectron2's evaluators). ``compute()`` gives COCO's
12 numbers (bbox or segm, :mod:`components.metrics.coco`, exact to pycocotools), per-class AP/AR
and Pascal VOC AP@0.5 (:mod:`components.metrics.voc`). COCO files are read into an evaluator by
:func:`components.metrics.coco_files.load_coco_evaluator`, through :meth:`DetectionEvaluator.from_instances`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from components.errors import EvaluationError
from components.metrics.coco import (
    COCO_METRIC_NAMES,
    IOU_THRESHOLDS,
    RECALL_THRESHOLDS,
    CocoAccumulation,
    evaluate_coco,
    per_class_coco,
    summarize_coco,
)
from components.metrics.confusion import detection_confusion_matrix
from components.metrics.instances import Instances, IouType, record_to_instances, to_numpy
from components.metrics.pairing import pair_instances
from components.metrics.voc import evaluate_voc

__all__ = ["COCO_METRIC_NAMES", "DetectionEvaluator", "IouType"]


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
    def from_instances(
        cls,
        names: Sequence[str],
        gt: Instances,
        dt: Instances,
        *,
        image_ids: Sequence[int],
        image_sizes: Sequence[tuple[int, int]],
        category_ids: Sequence[int] | None = None,
        iou_type: IouType = "bbox",
    ) -> DetectionEvaluator:
        """An evaluator holding a whole evaluation set given as columns (e.g. read from COCO files).

        Args:
            names: category names; category index k of ``gt`` and ``dt`` is ``names[k]``.
            gt: ground truths, ``image`` indexing ``image_ids`` and ``ann_id`` kept as given
                (pycocotools reads an id of 0 as "no match").
            dt: detections, indexed alike.
            image_ids: the id of each image index.
            image_sizes: ``(height, width)`` of each image (``(0, 0)`` when unknown).
            category_ids: the id of each category index (default 1..K), used by :meth:`to_coco`.
            iou_type: ``"bbox"`` or ``"segm"`` (both instance sets then carry ``rles``).

        Raises:
            EvaluationError: the lists disagree in length, or an image id repeats.
        """
        ev = cls(list(names), iou_type=iou_type)
        ids = [int(i) for i in image_ids]
        if len(image_sizes) != len(ids) or len(set(ids)) != len(ids):
            raise EvaluationError(
                f"{len(ids)} image ids ({len(set(ids))} distinct) for {len(image_sizes)} image sizes",
                record="image_ids",
                fix="one unique id and one (height, width) per image",
            )
        if category_ids is not None:
            if len(category_ids) != len(ev.names):
                raise EvaluationError(
                    f"{len(category_ids)} category ids for {len(ev.names)} names",
                    record="category_ids",
                    fix="one id per category name",
                )
            ev.category_ids = [int(c) for c in category_ids]
        ev._image_ids = ids
        ev._image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        ev._seen = set(ids)
        ev._gt, ev._dt = [gt], [dt]
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
                int(to_numpy(target["image_id"]).reshape(-1)[0])
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
            gt = self._record(target, index, image_id, is_pred=False)
            gt.ann_id = gt.ann_id + sum(len(g) for g in self._gt)  # unique over the whole set
            dt = self._record(pred, index, image_id, is_pred=True)
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

    def _record(self, d: Mapping[str, Any], index: int, image_id: int, *, is_pred: bool) -> Instances:
        return record_to_instances(
            d,
            index=index,
            image_id=image_id,
            is_pred=is_pred,
            num_categories=self.num_categories,
            iou_type=self.iou_type,
            mask_threshold=self.mask_threshold,
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
        pairs = pair_instances(gt, dt, K, self.iou_type)
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
