"""``visionflow evaluate``: COCO and VOC metrics of a COCO results file against a COCO ground-truth file.

Light by design: this module and what it imports need numpy and ``pycocotools.mask`` only (no
torch, no training code, no MLflow, no Prefect; matplotlib only when plots are written), so the
command starts fast and runs anywhere the files are.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from components.errors import EvaluationError
from components.io import write_json
from components.metrics.coco_files import load_coco_evaluator, read_user_json
from components.metrics.reports import format_detection_table, write_detection_reports


def evaluate_files(
    gt: Path,
    pred: Path,
    *,
    iou_type: str = "bbox",
    out: Path | None = None,
    plots_dir: Path | None = None,
    pr_iou_thresholds: tuple[float, ...] = (0.5, 0.75),
    confusion_iou: float = 0.5,
    confusion_score: float = 0.25,
    quiet: bool = False,
) -> dict[str, Any]:
    """Evaluate a COCO results file against a COCO ground-truth file, print a table, write the metrics.

    Args:
        gt: COCO instances JSON (images, annotations with ``area`` and ``iscrowd``, categories).
        pred: COCO results JSON ``[{image_id, category_id, score, bbox | segmentation}]``.
        iou_type: ``"bbox"`` or ``"segm"`` (masks: RLE or polygons).
        out: where to write the metrics JSON (``{iou_type: {...}}``); None writes nothing. With
            ``out``, the PR curves and confusion matrix go to ``plots_dir`` (default: the folder
            ``<out stem>_plots`` beside it).
        plots_dir: folder for the PNG and DVC plot files (written even without ``out``).
        pr_iou_thresholds: IoU thresholds of the PR curves.
        confusion_iou: IoU pairing detections with objects in the confusion matrix.
        confusion_score: detections scoring below are left out of the confusion matrix.
        quiet: do not print the table.

    Returns:
        ``{iou_type: {map, map_50, ..., mar_large, per_class, voc}}``, exactly pycocotools' 12 numbers.

    Raises:
        EvaluationError: a file is missing, not JSON, or has a bad record (named in the message).
    """
    if iou_type not in ("bbox", "segm"):
        raise EvaluationError(f"unknown iou type {iou_type!r}", record="--iou-type", fix="use bbox or segm")
    gt, pred = Path(gt), Path(pred)
    gt_data = read_user_json(gt, "ground truth")
    results = read_user_json(pred, "predictions")
    evaluator, n_unknown = load_coco_evaluator(
        gt_data, results, iou_type=iou_type, gt_file=gt, pred_file=pred
    )
    metrics = evaluator.compute()
    if not quiet:
        print(format_detection_table(metrics[iou_type], iou_type))
        if n_unknown:
            print(
                f"note: {n_unknown} detections of categories absent from {gt.name} were ignored (as pycocotools does)",
                file=sys.stderr,
            )
    if out is not None:
        write_json(metrics, Path(out))
        if plots_dir is None:
            plots_dir = Path(out).parent / f"{Path(out).stem}_plots"
    if plots_dir is not None:
        write_detection_reports(
            evaluator,
            Path(plots_dir),
            pr_iou_thresholds=pr_iou_thresholds,
            confusion_iou=confusion_iou,
            confusion_score=confusion_score,
        )
    return metrics
