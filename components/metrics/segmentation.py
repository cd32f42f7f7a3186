"""Semantic segmentation metrics from one accumulated confusion matrix.

Every pixel whose target is not ``ignore_index`` adds one count at ``[true class, predicted
class]`` of a ``C x C`` confusion matrix ``M`` (C = K + 1 classes, 0 = background), accumulated
over batches so the result does not depend on how images are batched. With ``n_ij = M[i, j]``,
``t_i = sum_j n_ij`` (pixels of class i) and the FCN paper's definitions (Long et al., 2015):

* per-class IoU ``n_ii / (t_i + sum_j n_ji - n_ii)`` (the lecture's IoU on pixel sets);
* mean IoU: the mean over classes present in the target or the prediction (others are NaN);
* pixel accuracy ``sum_i n_ii / sum_i t_i``; mean (per-class) accuracy ``mean_i n_ii / t_i``;
* frequency-weighted IoU ``sum_i t_i IoU_i / sum_i t_i``.

Counting is one ``bincount`` of ``C * target + prediction``; torch inputs are counted on their
own device (no transfer of whole masks from the GPU) and numpy inputs with numpy, so this module
imports neither torch nor anything heavy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from components.errors import EvaluationError


def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """Pixel confusion matrix of one batch.

    Args:
        pred (Tensor | ndarray [N, C, H, W] scores or [N, H, W] / [H, W] class indices): predictions;
            scores are turned into classes by argmax over C.
        target (Tensor | ndarray [N, H, W] / [H, W]): true class per pixel, ``ignore_index`` to skip.
        num_classes: C (background included).
        ignore_index: target value of pixels left out (None: none).

    Returns:
        ndarray[C, C] int64: rows are the true class, columns the predicted one.

    Raises:
        EvaluationError: shapes disagree or a target value is neither a class nor ``ignore_index``.
    """
    if hasattr(pred, "detach"):
        return _confusion_torch(pred, target, num_classes, ignore_index)
    p = np.asarray(pred)
    t = np.asarray(target)
    if p.ndim == t.ndim + 1:
        if p.shape[-3] != num_classes:
            raise EvaluationError(
                f"scores have {p.shape[-3]} channels for {num_classes} classes",
                record="preds",
                fix="pass [N, C, H, W] logits with C = K + 1",
            )
        p = p.argmax(axis=-3)
    if p.shape != t.shape:
        raise EvaluationError(
            f"prediction shape {p.shape} != target shape {t.shape}",
            record="preds",
            fix="predict at the target's size",
        )
    t = t.reshape(-1).astype(np.int64)
    p = p.reshape(-1).astype(np.int64)
    valid = t != ignore_index if ignore_index is not None else np.ones(t.shape, bool)
    t, p = t[valid], p[valid]
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        raise EvaluationError(
            f"target class {int(t.max() if t.max() >= num_classes else t.min())} outside 0..{num_classes - 1}",
            record="targets",
            fix=f"classes are 0..{num_classes - 1}, {ignore_index} marks ignored pixels",
        )
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise EvaluationError(
            f"predicted class outside 0..{num_classes - 1}", record="preds", fix="predict class indices 0..K"
        )
    return np.bincount(num_classes * t + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def _confusion_torch(pred: Any, target: Any, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """:func:`confusion_matrix` computed on the tensors' device; only the C x C counts come back."""
    import torch  # the caller already holds torch tensors, so this import is free

    p, t = pred.detach(), target.detach().to(pred.device)
    if p.dim() == t.dim() + 1:
        if p.shape[-3] != num_classes:
            raise EvaluationError(
                f"scores have {p.shape[-3]} channels for {num_classes} classes",
                record="preds",
                fix="pass [N, C, H, W] logits with C = K + 1",
            )
        p = p.argmax(dim=-3)
    if p.shape != t.shape:
        raise EvaluationError(
            f"prediction shape {tuple(p.shape)} != target shape {tuple(t.shape)}",
            record="preds",
            fix="predict at the target's size",
        )
    t = t.reshape(-1).long()
    p = p.reshape(-1).long()
    if ignore_index is not None:
        keep = t != ignore_index
        t, p = t[keep], p[keep]
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_classes:
            raise EvaluationError(
                f"target class {hi if hi >= num_classes else lo} outside 0..{num_classes - 1}",
                record="targets",
                fix=f"classes are 0..{num_classes - 1}, {ignore_index} marks ignored pixels",
            )
        if int(p.min()) < 0 or int(p.max()) >= num_classes:
            raise EvaluationError(
                f"predicted class outside 0..{num_classes - 1}",
                record="preds",
                fix="predict class indices 0..K",
            )
    counts = torch.bincount(num_classes * t + p, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def segmentation_scores(matrix: np.ndarray) -> dict[str, Any]:
    """Per-class IoU, mIoU, pixel accuracy, mean accuracy and frequency-weighted IoU of a confusion matrix.

    Args:
        matrix (ndarray[C, C]): rows true class, columns predicted class.

    Returns:
        ``{"miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "iou": [C], "accuracy": [C]}``;
        a class absent from both target and prediction has IoU NaN (left out of the means);
        with no counted pixel at all every number is NaN.
    """
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    true_total = m.sum(axis=1)  # t_i
    pred_total = m.sum(axis=0)
    union = true_total + pred_total - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(true_total > 0, tp / true_total, np.nan)
        total = m.sum()
        present = ~np.isnan(iou)
        miou = float(np.mean(iou[present])) if present.any() else float("nan")
        pixel_accuracy = float(tp.sum() / total) if total > 0 else float("nan")
        mean_accuracy = float(np.nanmean(acc)) if (~np.isnan(acc)).any() else float("nan")
        freq = true_total / total if total > 0 else np.full_like(true_total, np.nan)
        fw_iou = float(np.sum(freq[present] * iou[present])) if total > 0 else float("nan")
    return {
        "miou": miou,
        "pixel_accuracy": pixel_accuracy,
        "mean_accuracy": mean_accuracy,
        "fw_iou": fw_iou,
        "iou": iou.tolist(),
        "accuracy": acc.tolist(),
    }


class SegmentationEvaluator:
    """Accumulating semantic-segmentation evaluator: ``reset()``, ``update(preds, targets)``, ``compute()``.

    Args:
        num_classes: C = K + 1 (index 0 is background).
        ignore_index: target value of pixels left out (255 in the canonical masks).
        class_names: names of indices 0..C-1 (default ``"0".."C-1"``).
    """

    def __init__(
        self, num_classes: int, *, ignore_index: int | None = 255, class_names: list[str] | None = None
    ) -> None:
        if num_classes < 2:
            raise EvaluationError(
                "need at least 2 classes (background and one)", record="num_classes", fix="pass K + 1"
            )
        names = [str(c) for c in (class_names if class_names is not None else range(num_classes))]
        if len(names) != num_classes:
            raise EvaluationError(
                f"{len(names)} class names for {num_classes} classes",
                record="class_names",
                fix="name every class, background first",
            )
        self.names = names
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def reset(self) -> None:
        """Forget every pixel seen."""
        self.matrix[:] = 0

    def update(self, preds: Any, targets: Any) -> None:
        """Add a batch: ``preds`` [N, C, H, W] scores or [N, H, W] classes, ``targets`` [N, H, W]."""
        self.matrix += confusion_matrix(preds, targets, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, Any]:
        """``{miou, pixel_accuracy, mean_accuracy, fw_iou, per_class_iou: {name: IoU or None}}``.

        Flat (one task), so the engine's early stopping can monitor ``"miou"`` directly.
        """
        scores = segmentation_scores(self.matrix)
        return {
            "miou": scores["miou"],
            "pixel_accuracy": scores["pixel_accuracy"],
            "mean_accuracy": scores["mean_accuracy"],
            "fw_iou": scores["fw_iou"],
            # JSON has no NaN: a class absent from target and prediction has IoU None
            "per_class_iou": {
                n: (None if v != v else v) for n, v in zip(self.names, scores["iou"], strict=True)
            },
        }
