"""Semantic-segmentation metrics against their set definitions and a hand-computed case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.errors import EvaluationError
from components.metrics.segmentation import SegmentationEvaluator, confusion_matrix, segmentation_scores


def _reference(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int = 255) -> dict:
    """The FCN paper's definitions written on pixel sets, class by class (no confusion matrix)."""
    valid = target != ignore
    p, t = pred[valid], target[valid]
    ious, freqs = [], []
    for c in range(num_classes):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        ious.append(inter / union if union else np.nan)
        freqs.append(np.sum(t == c) / t.size)
    ious_a = np.array(ious)
    present = ~np.isnan(ious_a)
    return {
        "iou": ious_a,
        "miou": ious_a[present].mean(),
        "pixel_accuracy": np.mean(p == t),
        "fw_iou": np.sum(np.array(freqs)[present] * ious_a[present]),
    }


def test_hand_computed():
    target = np.array([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 0]])
    m = confusion_matrix(pred, target, 3)
    np.testing.assert_array_equal(m, [[2, 1, 0], [0, 2, 0], [1, 0, 1]])  # the ignored pixel is not counted
    s = segmentation_scores(m)
    # IoU: class 0: 2 / (3 + 3 - 2) = .5; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 1 / (2 + 1 - 1) = .5
    np.testing.assert_allclose(s["iou"], [0.5, 2 / 3, 0.5])
    assert s["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert s["pixel_accuracy"] == pytest.approx(5 / 7)
    assert s["fw_iou"] == pytest.approx(3 / 7 * 0.5 + 2 / 7 * 2 / 3 + 2 / 7 * 0.5)


@pytest.mark.parametrize("seed", range(3))
def test_matches_set_definitions_and_is_batch_invariant(seed):
    rng = np.random.default_rng(seed)
    C = 5
    target = rng.integers(0, C - 1, (6, 16, 20))  # the last class never appears in the target...
    target[rng.random(target.shape) < 0.1] = 255
    logits = rng.normal(size=(6, C, 16, 20))
    pred = logits.argmax(1)
    ev = SegmentationEvaluator(C)
    for i in range(0, 6, 4):
        ev.update(torch.from_numpy(logits[i : i + 4]), torch.from_numpy(target[i : i + 4]))  # logits, torch
    whole = SegmentationEvaluator(C)
    whole.update(pred, target)  # class indices, numpy, one batch
    np.testing.assert_array_equal(ev.matrix, whole.matrix)
    ref = _reference(pred, target, C)
    out = ev.compute()
    for key in ("miou", "pixel_accuracy", "fw_iou"):
        assert out[key] == pytest.approx(ref[key], abs=1e-12)
    got = np.array([np.nan if v is None else v for v in out["per_class_iou"].values()])
    np.testing.assert_allclose(got, ref["iou"], atol=1e-12)  # ... but is predicted: IoU 0, counted
    ev.reset()
    assert ev.matrix.sum() == 0


def test_absent_class_is_left_out_of_the_mean():
    target = np.zeros((4, 4), np.int64)
    target[:2] = 1
    out = SegmentationEvaluator(3, class_names=["background", "a", "b"])
    out.update(target.copy(), target)
    r = out.compute()
    assert r["per_class_iou"] == {"background": 1.0, "a": 1.0, "b": None}
    assert r["miou"] == 1.0 and r["pixel_accuracy"] == 1.0 and r["fw_iou"] == pytest.approx(1.0)


def test_bad_inputs_raise_evaluation_errors():
    with pytest.raises(EvaluationError, match="class names"):
        SegmentationEvaluator(3, class_names=["background", "a"])
    ev = SegmentationEvaluator(3)
    with pytest.raises(EvaluationError, match="target class 7"):
        ev.update(np.zeros((2, 2), np.int64), np.full((2, 2), 7))
    with pytest.raises(EvaluationError, match="shape"):
        ev.update(np.zeros((2, 3), np.int64), np.zeros((2, 2), np.int64))
    with pytest.raises(EvaluationError, match="channels"):
        ev.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64))
    with pytest.raises(EvaluationError, match="target class 9"):
        ev.update(torch.zeros(1, 2, 2, dtype=torch.int64), torch.full((1, 2, 2), 9))
