"""Evaluation reports a person reads: the metrics table, PR curves and confusion matrices on disk.

Used by ``visionflow evaluate`` and by the training stages after their last validation, so that
every detector run leaves the same files: ``pr_curves.png``, ``pr_iou50.csv`` / ``pr_iou75.csv``
(DVC ``linear`` plots), ``confusion_matrix.png``, ``confusion_matrix.json`` (the matrix with
its labels) and ``confusion_dvc.json`` (DVC ``confusion`` plot records).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from components.io import write_json
from components.metrics.coco import COCO_METRIC_NAMES
from components.metrics.detection import DetectionEvaluator

_LABELS = {
    "map": "AP @[IoU=0.50:0.95 | area=   all | maxDets=100]",
    "map_50": "AP @[IoU=0.50      | area=   all | maxDets=100]",
    "map_75": "AP @[IoU=0.75      | area=   all | maxDets=100]",
    "map_small": "AP @[IoU=0.50:0.95 | area= small | maxDets=100]",
    "map_medium": "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "map_large": "AP @[IoU=0.50:0.95 | area= large | maxDets=100]",
    "mar_1": "AR @[IoU=0.50:0.95 | area=   all | maxDets=  1]",
    "mar_10": "AR @[IoU=0.50:0.95 | area=   all | maxDets= 10]",
    "mar_100": "AR @[IoU=0.50:0.95 | area=   all | maxDets=100]",
    "mar_small": "AR @[IoU=0.50:0.95 | area= small | maxDets=100]",
    "mar_medium": "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "mar_large": "AR @[IoU=0.50:0.95 | area= large | maxDets=100]",
}


def _fmt(v: Any) -> str:
    return "   -  " if v is None or (isinstance(v, float) and v < 0) else f"{v:6.3f}"


def format_detection_table(metrics: Mapping[str, Any], iou_type: str = "bbox") -> str:
    """A readable table: COCO's 12 lines (pycocotools' wording), VOC mAP@0.5, then one row per class.

    Args:
        metrics: ``compute()[iou_type]`` of a :class:`DetectionEvaluator`.
        iou_type: shown in the header.

    Returns:
        The table as text ("-" where a value is undefined, e.g. a class without ground truth).
    """
    lines = [f"COCO metrics ({iou_type})"]
    for name in COCO_METRIC_NAMES:
        lines.append(f"  {_LABELS[name]} = {_fmt(metrics[name])}   {name}")
    voc = metrics.get("voc", {})
    if voc:
        lines.append(
            f"  VOC AP@0.5 all-point = {_fmt(voc['map_50'])}   11-point = {_fmt(voc['map_50_11point'])}"
        )
    per_class = metrics.get("per_class", {})
    if per_class:
        width = max(8, *(len(n) for n in per_class))
        lines.append("")
        lines.append(
            f"  {'class':<{width}}  {'num_gt':>6}  {'AP':>6}  {'AP50':>6}  {'AP75':>6}  {'AR100':>6}  {'VOC50':>6}  {'VOC07':>6}"
        )
        for name, row in per_class.items():
            lines.append(
                f"  {name:<{width}}  {row['num_gt']:>6}  {_fmt(row['ap'])}  {_fmt(row['ap_50'])}  {_fmt(row['ap_75'])}  "
                f"{_fmt(row['ar_100'])}  {_fmt(row.get('voc_ap_50'))}  {_fmt(row.get('voc_ap_50_11point'))}"
            )
    return "\n".join(lines)


def write_detection_reports(
    evaluator: DetectionEvaluator,
    out_dir: Path,
    *,
    pr_iou_thresholds: Sequence[float] = (0.5, 0.75),
    confusion_iou: float = 0.5,
    confusion_score: float = 0.25,
) -> dict[str, Path]:
    """Write PR curves and the detection confusion matrix (PNG + DVC files) of a computed evaluator.

    Args:
        evaluator: an evaluator after ``update`` calls (``compute`` is run if it was not).
        out_dir: folder to write into (created).
        pr_iou_thresholds: IoU thresholds of the PR curves (each one of .50:.05:.95).
        confusion_iou: IoU at which a detection and an object are paired in the confusion matrix.
        confusion_score: detections scoring below are left out of the confusion matrix.

    Returns:
        ``{name: path}`` of every file written.
    """
    from components import plots  # matplotlib is imported only here, when reports are asked for

    out_dir = Path(out_dir)
    curves = evaluator.pr_curves(pr_iou_thresholds)
    written: dict[str, Path] = {
        "pr_curves_png": plots.plot_pr_curves(
            curves, out_dir / "pr_curves.png", title=f"PR curves ({evaluator.iou_type})"
        )
    }
    for path in plots.write_dvc_pr_curves(curves, out_dir):
        written[path.stem] = path
    matrix = evaluator.confusion_matrix(iou_threshold=confusion_iou, score_threshold=confusion_score)
    labels = [*evaluator.names, "background"]
    title = f"Detections (score >= {confusion_score:g}, IoU >= {confusion_iou:g})"
    written["confusion_png"] = plots.plot_confusion_matrix(
        matrix, labels, out_dir / "confusion_matrix.png", title=title
    )
    written["confusion_json"] = write_json(
        {
            "labels": labels,
            "rows": "ground truth",
            "columns": "prediction",
            "iou_threshold": confusion_iou,
            "score_threshold": confusion_score,
            "matrix": matrix.tolist(),
        },
        out_dir / "confusion_matrix.json",
    )
    written["confusion_dvc"] = plots.write_dvc_confusion(matrix, labels, out_dir / "confusion_dvc.json")
    return written
