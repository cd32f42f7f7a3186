"""Mask R-CNN on our backbone + FPN: RoIAlign, the mask branch, the detection contract with masks, training."""

from __future__ import annotations

import torch
from test_fcn import tiny_scenes
from torchvision.ops import MultiScaleRoIAlign, masks_to_boxes

from components.models import get_model
from components.models.backbones import build_backbone
from components.models.mask_rcnn import BackboneWithFPN


def instance_targets(masks: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Detection targets with masks from semantic masks [N, H, W] holding one object per class."""
    targets = []
    for mask in masks:
        labels = torch.tensor([k for k in (1, 2) if (mask == k).any()], dtype=torch.int64)
        instance_masks = torch.stack([(mask == k) for k in labels.tolist()]).to(torch.uint8)
        targets.append(
            {
                "boxes": masks_to_boxes(instance_masks).float() + torch.tensor([0, 0, 1, 1]),
                "labels": labels,
                "masks": instance_masks,
            }
        )
    return targets


def test_backbone_with_fpn_levels():
    body = BackboneWithFPN(build_backbone("convnet_small"), out_channels=32)
    feats = body(torch.rand(1, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "pool"]  # strides 4, 8, 16 and the max-pooled 32
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2]
    assert all(f.shape[1] == 32 for f in feats.values())
    assert body.featmap_names == ["0", "1", "2"]


def test_mask_rcnn_uses_roi_align_and_a_mask_branch():
    model = get_model("segmentation", "mask_rcnn", num_classes=3)
    assert isinstance(model.roi_heads.box_roi_pool, MultiScaleRoIAlign)
    assert isinstance(model.roi_heads.mask_roi_pool, MultiScaleRoIAlign)
    assert model.roi_heads.has_mask()
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3


def test_mask_rcnn_eval_contract():
    torch.manual_seed(0)
    model = get_model("segmentation", "mask_rcnn", num_classes=3, image_size=48, score_threshold=0.0).eval()
    images = [torch.rand(3, 48, 48), torch.rand(3, 40, 56)]
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for image, det in zip(images, out, strict=True):
        n = det["boxes"].shape[0]
        assert (
            det["boxes"].shape == (n, 4)
            and det["labels"].dtype == torch.int64
            and det["scores"].shape == (n,)
        )
        assert det["masks"].shape == (n, 1, *image.shape[-2:])
        if n:
            assert 0.0 <= det["masks"].min() and det["masks"].max() <= 1.0
            assert det["labels"].min() >= 1 and det["labels"].max() <= 2


def test_mask_rcnn_trains_with_falling_loss():
    torch.manual_seed(0)
    images, masks = tiny_scenes(n=4, size=48)
    targets = instance_targets(masks)
    model = get_model("segmentation", "mask_rcnn", num_classes=3, image_size=48, trainable_layers=None)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    losses = []
    for _ in range(20):
        loss_dict = model(list(images), targets)
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append({k: v.item() for k, v in loss_dict.items()})
    total = [sum(d.values()) for d in losses]
    assert sum(total[-3:]) / 3 < 0.6 * total[0], total
    assert losses[-1]["loss_mask"] < 0.5 * losses[0]["loss_mask"], losses
