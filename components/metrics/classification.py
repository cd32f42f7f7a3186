"""Classification metrics as an accumulating evaluator: ``reset()``, ``update(preds, targets)``, ``compute()``.

Everything derives from one K x K confusion matrix ``C[i, j]`` = number of samples of true
class ``i`` predicted as ``j`` (rows: truth, columns: prediction, as ``sklearn.metrics.confusion_matrix``):

* accuracy = trace(C) / sum(C);
* per-class accuracy (recall) of class i = C[i, i] / sum_j C[i, j];
* precision_i = C[i, i] / sum_j C[j, i]; F1_i = 2 P_i R_i / (P_i + R_i), 0 when undefined;
* macro F1 = mean over the classes present in the targets or predictions (sklearn's ``f1_score(average="macro")``
  over the labels seen), so a class absent from both does not count as a zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class ClassificationMetrics:
    """Accumulates a confusion matrix over batches.

    Args:
        num_classes: K.
        class_names: names used as keys of ``per_class_accuracy`` (default ``"0".."K-1"``).
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, preds: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Args:
            preds: logits or probabilities Tensor[N, K], or predicted labels Tensor[N].
            targets: true labels Tensor[N] in 0..K-1.
        """
        if preds.ndim == 2:
            preds = preds.argmax(dim=1)
        preds = preds.detach().to("cpu", torch.int64).reshape(-1)
        targets = targets.detach().to("cpu", torch.int64).reshape(-1)
        if preds.shape != targets.shape:
            raise ValueError(f"{preds.numel()} predictions for {targets.numel()} targets")
        k = self.num_classes
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= k or int(preds.min()) < 0 or int(preds.max()) >= k):
            raise ValueError(f"labels must lie in 0..{k - 1}")
        self.confusion += torch.bincount(targets * k + preds, minlength=k * k).reshape(k, k)

    def compute(self) -> dict[str, Any]:
        """``{accuracy, macro_f1, per_class_accuracy {name: acc}, confusion_matrix [[...]], num_samples}``."""
        c = self.confusion.double()
        total = c.sum()
        tp = c.diag()
        support = c.sum(dim=1)  # true count per class
        predicted = c.sum(dim=0)
        recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
        denom = precision + recall
        f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
        seen = (support > 0) | (predicted > 0)
        return {
            "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
            "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
            "per_class_accuracy": {name: float(recall[i]) for i, name in enumerate(self.class_names) if support[i] > 0},
            "confusion_matrix": self.confusion.tolist(),
            "num_samples": int(total),
        }


@torch.no_grad()
def evaluate_classification(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: torch.device, *, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro F1, per-class accuracy, confusion matrix and mean cross-entropy of ``model`` on ``loader``.

    The engine's ``evaluate`` callback (bind ``class_names`` with ``functools.partial``).
    """
    metric = ClassificationMetrics(len(class_names), class_names)
    loss_sum, n = 0.0, 0
    for images, labels in loader:
        logits = model(images.to(device)).float().cpu()
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        n += labels.numel()
        metric.update(logits, labels)
    return {**metric.compute(), "loss": loss_sum / max(1, n)}
