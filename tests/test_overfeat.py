"""Sliding window and OverFeat: window grid, labels, the greedy merge on hand-made cases, box coding, fixed convs."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from components.models.backbones import build_backbone
from components.models.overfeat import OverFeat, greedy_merge, label_windows, sliding_windows


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# --------------------------------------------------------------------------- greedy merge


def test_greedy_merge_fuses_an_overlapping_pair_into_the_score_weighted_mean():
    boxes = _boxes([0, 0, 10, 10], [2, 0, 12, 10])  # IoU = 80 / 120 = 0.667
    scores = torch.tensor([0.9, 0.3])
    b, s, lab = greedy_merge(boxes, scores, torch.tensor([1, 1]), iou_threshold=0.5)
    assert len(b) == 1
    torch.testing.assert_close(b[0], (0.9 * boxes[0] + 0.3 * boxes[1]) / 1.2)
    assert s.item() == pytest.approx(0.9) and lab.item() == 1


def test_greedy_merge_keeps_distant_boxes_and_other_classes_apart():
    boxes = _boxes([0, 0, 10, 10], [50, 50, 60, 60], [1, 1, 11, 11])
    labels = torch.tensor([1, 1, 2])  # the third overlaps the first but is another class
    b, s, lab = greedy_merge(boxes, torch.tensor([0.5, 0.8, 0.7]), labels, iou_threshold=0.3)
    assert len(b) == 3
    assert s.tolist() == sorted(s.tolist(), reverse=True)
    torch.testing.assert_close(b, boxes[[1, 2, 0]])
    assert lab.tolist() == [1, 2, 1]


def test_greedy_merge_takes_the_best_matching_pair_first():
    """A chain A-B-C: B matches C better than A, so B and C merge first; the merge then matches A."""
    a, b_, c = [0, 0, 10, 10], [3, 0, 13, 10], [4, 0, 14, 10]
    boxes = _boxes(a, b_, c)
    iou = box_iou(boxes, boxes)
    assert iou[1, 2] > iou[0, 1] > 0.3
    out, s, _ = greedy_merge(boxes, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([3, 3, 3]), iou_threshold=0.3)
    assert len(out) == 1
    # (B + C) / 2 = [3.5, 0, 13.5, 10] with weight 2, then with A (weight 1): [7/3, 0, 37/3, 10]
    torch.testing.assert_close(out[0], torch.tensor([7 / 3, 0.0, 37 / 3, 10.0]))


def test_greedy_merge_stops_below_the_threshold():
    boxes = _boxes([0, 0, 10, 10], [5, 0, 15, 10])  # IoU = 50 / 150 = 0.333
    b, _, _ = greedy_merge(boxes, torch.tensor([0.6, 0.5]), torch.tensor([1, 1]), iou_threshold=0.4)
    assert len(b) == 2
    b, _, _ = greedy_merge(boxes, torch.tensor([0.6, 0.5]), torch.tensor([1, 1]), iou_threshold=0.3)
    assert len(b) == 1


def test_greedy_merge_of_nothing():
    b, s, lab = greedy_merge(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), iou_threshold=0.3
    )
    assert b.shape == (0, 4) and s.shape == (0,) and lab.shape == (0,)


# --------------------------------------------------------------------------- sliding windows


def test_sliding_windows_cover_the_image_at_every_size():
    windows = sliding_windows((64, 80), [16, 40], stride_fraction=0.5)
    sizes = (windows[:, 2] - windows[:, 0]).unique().tolist()
    assert sizes == [16.0, 40.0]
    assert torch.all(windows[:, 2] - windows[:, 0] == windows[:, 3] - windows[:, 1])
    assert windows[:, 0].min() == 0 and windows[:, 2].max() == 80 and windows[:, 3].max() == 64
    # size 16, stride 8: 9 columns x 7 rows; size 40, stride 20: x in {0, 20, 40}, y in {0, 20, 24}
    assert len(windows) == 9 * 7 + 3 * 3


def test_label_windows_positive_background_and_ignored():
    windows = _boxes([0, 0, 10, 10], [1, 0, 11, 10], [5, 0, 15, 10], [40, 40, 50, 50])
    labels = label_windows(windows, _boxes([0, 0, 10, 10]), torch.tensor([4]))
    assert labels.tolist() == [4, 4, -1, 0]  # IoU 1, 0.82, 0.33 (between 0.3 and 0.5), 0


# --------------------------------------------------------------------------- OverFeat


def _overfeat(**kw) -> OverFeat:
    return OverFeat(build_backbone("convnet_small"), num_classes=3, image_size=64, **kw)


def test_box_coding_relative_to_the_window_round_trips():
    windows = torch.tensor([[20.0, 30.0, 48.0, 48.0], [50.0, 10.0, 32.0, 32.0]])  # cx, cy, side, side
    boxes = _boxes([5, 12, 40, 44], [40, 0, 64, 30])
    reg = OverFeat.encode(boxes, windows)
    torch.testing.assert_close(OverFeat.decode(reg, windows), boxes)
    torch.testing.assert_close(reg[0], torch.tensor([(22.5 - 20) / 48, (28 - 30) / 48, 35 / 48, 32 / 48]))


def test_windows_follow_the_feature_grid_and_the_scale():
    model = _overfeat(window_size=32)
    w1 = model.windows_at(4, 4, 1.0, torch.device("cpu"))
    w2 = model.windows_at(6, 6, 1.5, torch.device("cpu"))
    stride = model.stride
    torch.testing.assert_close(w1[0], torch.tensor([stride / 2, stride / 2, 32.0, 32.0]))
    torch.testing.assert_close(
        w2[-1], torch.tensor([5.5 * stride / 1.5, 5.5 * stride / 1.5, 32 / 1.5, 32 / 1.5])
    )


def test_assign_labels_centre_positives_ignores_the_rest_of_the_box():
    model = _overfeat(window_size=32, center_fraction=0.5)
    windows = torch.tensor([[20.0, 20.0, 32, 32], [6.0, 20.0, 32, 32], [50.0, 50.0, 32, 32]])
    labels, obj = model.assign(windows, _boxes([0, 0, 40, 40]), torch.tensor([2]))
    # centre (20, 20) is in the central half (|dx| <= 10); (6, 20) is inside the box but outside it; (50, 50) is background
    assert labels.tolist() == [2, -1, 0]
    assert obj[0] == 0


def test_regression_loss_leaves_the_convolutional_layers_fixed():
    """The lecture: the regression head is trained with the conv layers fixed (no gradient reaches them)."""
    torch.manual_seed(0)
    model = _overfeat()
    model.train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": _boxes([8, 8, 40, 36]), "labels": torch.tensor([1])} for _ in range(2)]
    losses = model(images, targets)
    assert losses["loss_box_reg"] > 0
    losses["loss_box_reg"].backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.reg_head.parameters())
    assert all(p.grad is None for p in model.cls_head.parameters())


def test_hard_negatives_are_the_worst_classified_background_windows():
    """With many background windows, the classification loss uses positives + random + the hardest negatives."""
    torch.manual_seed(0)
    model = _overfeat(negatives_per_image=0, hard_negative_ratio=1.0)
    windows = model.windows_at(4, 4, 1.0, torch.device("cpu"))
    logits = torch.zeros(1, 16, 4)
    logits[0, :, 0] = 5.0  # every window confidently background ...
    logits[0, 15, 0], logits[0, 15, 2] = -5.0, 5.0  # ... but the last one, a confident false positive
    reg = torch.zeros(1, 16, 4)
    target = {"boxes": _boxes([0, 0, 14, 14]), "labels": torch.tensor([1])}
    labels, _ = model.assign(windows, target["boxes"], target["labels"])
    n_pos = int((labels > 0).sum())
    losses = model.losses([(logits, reg, windows)], [target])
    ce = torch.nn.functional.cross_entropy(logits[0], labels.clamp(min=0), reduction="none")
    pos = ce[labels > 0]
    hardest = ce[labels == 0].sort(descending=True).values[:n_pos]
    torch.testing.assert_close(losses["loss_classifier"], torch.cat([pos, hardest]).mean())
