"""Box and mask IoU, NMS and merges against torchvision.ops and pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import batched_nms, box_convert, box_iou

from components.metrics.overlaps import (
    box_iou_xywh,
    box_iou_xyxy,
    encode_masks,
    mask_iou,
    rle_area,
    rle_iou,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from components.ops.boxes import (
    elementwise_box_iou,
    merge_boxes,
    pairwise_box_iou,
    pairwise_mask_iou,
    postprocess_detections,
    rescale_boxes,
)


def _random_xywh(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(-10, 100, (n, 2))
    wh = np.where(rng.random((n, 2)) < 0.2, rng.uniform(0, 2, (n, 2)), rng.uniform(1, 80, (n, 2)))
    wh[rng.random(n) < 0.05] = 0.0  # empty boxes
    return np.c_[xy, wh]


@pytest.mark.parametrize("seed", range(5))
def test_coco_box_iou_is_bit_exact_with_pycocotools(seed):
    rng = np.random.default_rng(seed)
    dt, gt = _random_xywh(rng, 40), _random_xywh(rng, 30)
    gt[:5] = dt[:5]  # identical boxes: IoU exactly 1
    crowd = rng.random(30) < 0.3
    ours = box_iou_xywh(dt, gt, crowd)
    ref = mask_utils.iou(dt.tolist(), gt.tolist(), crowd.astype(np.uint8).tolist())
    assert np.array_equal(ours, ref)  # same doubles, not just close: matching compares IoU >= t
    assert np.array_equal(box_iou_xywh(dt, gt), mask_utils.iou(dt.tolist(), gt.tolist(), [0] * 30))


def test_box_iou_formats_agree_with_torchvision():
    rng = np.random.default_rng(1)
    a, b = xywh_to_xyxy(_random_xywh(rng, 20)), xywh_to_xyxy(_random_xywh(rng, 15))
    ref = box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(box_iou_xyxy(a, b), np.nan_to_num(ref), atol=1e-12)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    for fmt in ("xywh", "cxcywh"):
        got = pairwise_box_iou(box_convert(ta, "xyxy", fmt), box_convert(tb, "xyxy", fmt), fmt=fmt)
        torch.testing.assert_close(
            torch.nan_to_num(got), torch.nan_to_num(box_iou(ta, tb)), atol=1e-9, rtol=0
        )
    np.testing.assert_allclose(xyxy_to_xywh(xywh_to_xyxy(a)), a, atol=1e-12)


def test_elementwise_iou_is_the_diagonal_and_differentiable():
    rng = np.random.default_rng(2)
    a = torch.from_numpy(xywh_to_xyxy(_random_xywh(rng, 10) + [0, 0, 1, 1])).requires_grad_()
    b = torch.from_numpy(xywh_to_xyxy(_random_xywh(rng, 10) + [0, 0, 1, 1]))
    got = elementwise_box_iou(a, b)
    torch.testing.assert_close(got, torch.diagonal(box_iou(a, b)), atol=1e-7, rtol=0)
    got.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    lecture = elementwise_box_iou(torch.tensor([0.0, 0, 2, 2]), torch.tensor([1.0, 1, 3, 3]))
    assert lecture.item() == pytest.approx(1 / 7)  # area(B n B^) / area(B u B^) = 1 / (4 + 4 - 1)


def _random_masks(rng: np.random.Generator, n: int, h: int = 24, w: int = 30) -> np.ndarray:
    masks = np.zeros((n, h, w), np.uint8)
    for m in masks:
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        m[y0 : y0 + rng.integers(1, h), x0 : x0 + rng.integers(1, w)] = 1
        m &= (rng.random((h, w)) < 0.9).astype(np.uint8)
    return masks


def test_mask_iou_binary_rle_torch_and_pycocotools_agree():
    rng = np.random.default_rng(3)
    d, g = _random_masks(rng, 7), _random_masks(rng, 5)
    g[0] = 0  # an empty mask
    crowd = np.array([0, 1, 0, 1, 0], bool)
    rd, rg = encode_masks(d), encode_masks(g)
    ref = np.asarray(mask_utils.iou(rd, rg, crowd.astype(np.uint8).tolist()))
    np.testing.assert_allclose(rle_iou(rd, rg, crowd), ref, atol=0)
    np.testing.assert_allclose(mask_iou(d, g, crowd), ref, atol=1e-15)
    np.testing.assert_allclose(
        pairwise_mask_iou(torch.from_numpy(d), torch.from_numpy(g)).numpy(), mask_iou(d, g), atol=1e-15
    )
    np.testing.assert_array_equal(rle_area(rd), d.reshape(7, -1).sum(1))
    np.testing.assert_array_equal(mask_utils.decode(rd).transpose(2, 0, 1), d)
    many = encode_masks(np.ones((300, 4, 4), np.uint8))  # > 255 RLEs (pycocotools' area() overflows there)
    assert rle_area(many).tolist() == [16.0] * 300


def test_postprocess_detections_is_per_class_nms_then_top_k():
    rng = np.random.default_rng(4)
    boxes = torch.from_numpy(xywh_to_xyxy(_random_xywh(rng, 200) + [0, 0, 2, 2])).float()
    scores = torch.rand(200, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(1, 4, (200,), generator=torch.Generator().manual_seed(1))
    b, s, lab = postprocess_detections(
        boxes, scores, labels, score_threshold=0.2, nms_iou=0.5, max_detections=30, min_size=0.0
    )
    keep = scores >= 0.2
    ref = batched_nms(boxes[keep], scores[keep], labels[keep], 0.5)[:30]
    torch.testing.assert_close(b, boxes[keep][ref])
    assert len(s) == 30 and torch.all(s[:-1] >= s[1:])
    same = labels[keep][ref]
    assert torch.equal(lab, same)
    for c in lab.unique():  # no two kept boxes of a class overlap beyond the NMS threshold
        iou = box_iou(b[lab == c], b[lab == c]).fill_diagonal_(0)
        assert iou.max() <= 0.5 + 1e-6


def test_merge_boxes_averages_a_cluster_by_score():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.3, 0.8, 0.5])
    labels = torch.tensor([1, 1, 2, 1])  # the third box is another class: it does not merge
    merged, s, lab = merge_boxes(boxes, scores, labels, iou_threshold=0.3)
    assert lab.tolist() == [1, 2, 1] and s.tolist() == pytest.approx([0.9, 0.8, 0.5])
    expected = (0.9 * boxes[0] + 0.3 * boxes[1]) / 1.2
    torch.testing.assert_close(merged[0], expected)
    torch.testing.assert_close(merged[1:], boxes[[2, 3]])
    e = merge_boxes(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert e[0].shape == (0, 4)


def test_rescale_boxes():
    b = torch.tensor([[10.0, 20, 30, 40]])
    torch.testing.assert_close(rescale_boxes(b, (100, 200), (50, 400)), torch.tensor([[20.0, 10, 60, 20]]))
