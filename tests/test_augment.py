"""Augmentation presets keep boxes, masks and labels together (property-based), and the preview stage."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision import tv_tensors

from components.augment import build_transforms, write_preview
from components.config import AugmentConfig, DataConfig, ShapesConfig
from components.data.ingest import ingest
from components.errors import ConfigError

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def detection_samples(draw):
    """An image with N rectangles; object i's mask fills its box exactly and its label is i + 1 (unique)."""
    h, w = draw(st.integers(24, 64)), draw(st.integers(24, 64))
    n = draw(st.integers(0, 5))
    boxes, masks = [], torch.zeros((n, h, w), dtype=torch.uint8)
    for i in range(n):
        x0, y0 = draw(st.integers(0, w - 4)), draw(st.integers(0, h - 4))
        x1, y1 = draw(st.integers(x0 + 3, w)), draw(st.integers(y0 + 3, h))
        boxes.append([x0, y0, x1, y1])
        masks[i, y0:y1, x0:x1] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
        ),
        "labels": torch.arange(1, n + 1),
        "masks": tv_tensors.Mask(masks),
        "area": masks.flatten(1).sum(1).float(),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
    }
    return tv_tensors.Image(torch.rand(3, h, w)), target, draw(st.integers(0, 2**31 - 1))


@FAST
@given(sample=detection_samples(), size=st.sampled_from([32, 48]))
def test_yolo_preset_moves_boxes_masks_labels_together(sample, size):
    image, target, seed = sample
    n_before = len(target["labels"])
    torch.manual_seed(seed)
    t = build_transforms("detection", AugmentConfig(), train=True, image_size=size)
    out_image, out = t(image, target)
    n = len(out["labels"])
    assert out_image.shape == (3, size, size)
    assert (
        out["boxes"].shape == (n, 4) and out["masks"].shape == (n, size, size) and out["area"].shape == (n,)
    )
    assert out["iscrowd"].shape == (n,) and n <= n_before
    assert len(set(out["labels"].tolist())) == n  # each surviving label is one original object, no duplicates
    b = out["boxes"].as_subclass(torch.Tensor)
    assert (
        (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= size).all() and (b[:, 3] <= size).all()
    )
    assert ((b[:, 2:] - b[:, :2]) >= AugmentConfig().min_box_size).all()
    # each mask stays with its own box: its centre inside, its pixels within the nearest-neighbour resampling
    # error, which grows with the magnification (final resize x affine scale x resized-crop zoom)
    h, w = image.shape[-2:]
    zoom = size / min(h, w) * AugmentConfig().scale[1] / (AugmentConfig().crop_scale[0] * 3 / 4) ** 0.5
    tol = 1.0 + zoom
    for box, mask in zip(b, out["masks"], strict=True):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):
            assert (
                box[0] - 1 <= xs.float().mean() + 0.5 <= box[2] + 1
                and box[1] - 1 <= ys.float().mean() + 0.5 <= box[3] + 1
            )
            assert xs.min() >= box[0] - tol and xs.max() + 1 <= box[2] + tol
            assert ys.min() >= box[1] - tol and ys.max() + 1 <= box[3] + tol
    assert torch.equal(out["area"], out["masks"].flatten(1).sum(1).float())


@FAST
@given(sample=detection_samples())
def test_horizontal_flip_is_exact(sample):
    image, target, _ = sample
    h, w = image.shape[-2:]
    size = 40
    cfg = AugmentConfig(detection="basic", hflip=1.0)
    t = build_transforms("detection", cfg, train=True, image_size=size)
    _, out = t(image, {k: v.clone() for k, v in target.items()})
    keep = out["labels"] - 1
    b = target["boxes"].as_subclass(torch.Tensor)
    sx, sy = size / w, size / h  # the preset's final resize scales boxes exactly
    expected = torch.stack([(w - b[:, 2]) * sx, b[:, 1] * sy, (w - b[:, 0]) * sx, b[:, 3] * sy], dim=1)[keep]
    assert torch.allclose(out["boxes"].as_subclass(torch.Tensor), expected, atol=1e-4)
    # only boxes the resize made smaller than min_box_size are dropped
    for i in set(range(len(b))) - set(keep.tolist()):
        assert min((b[i, 2] - b[i, 0]) * sx, (b[i, 3] - b[i, 1]) * sy) < cfg.min_box_size
    if (h, w) == (size, size):
        assert torch.equal(out["masks"], target["masks"][keep].flip(-1))


@FAST
@given(
    h=st.integers(24, 64),
    w=st.integers(24, 64),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    preset=st.sampled_from(["basic", "elastic"]),
)
def test_segmentation_presets_keep_mask_values(h, w, k, seed, preset):
    g = torch.Generator().manual_seed(seed)
    mask = tv_tensors.Mask(torch.randint(0, k + 1, (h, w), generator=g))
    torch.manual_seed(seed)
    t = build_transforms("segmentation", AugmentConfig(segmentation=preset), train=True, image_size=32)
    image, out = t(tv_tensors.Image(torch.rand(3, h, w)), mask)
    assert image.shape == (3, 32, 32) and out.shape == (32, 32) and out.dtype == torch.int64
    assert set(out.unique().tolist()) <= set(range(k + 1)) | {255}  # nearest-neighbour: no invented classes


def test_presets_resize_and_unknown_names_raise():
    cfg = AugmentConfig()
    for task in ("classification", "detection", "segmentation"):
        for train in (True, False):
            assert build_transforms(task, cfg, train=train, image_size=40) is not None
    out = build_transforms(
        "classification", AugmentConfig(classification="strong", vflip=0.5), train=True, image_size=40
    )(tv_tensors.Image(torch.rand(3, 50, 70)))
    assert out.shape == (3, 40, 40)
    with pytest.raises(ConfigError, match="unknown detection preset 'mosaic'"):
        build_transforms(
            "detection", AugmentConfig.model_construct(detection="mosaic"), train=True, image_size=32
        )
    with pytest.raises(ConfigError, match="unknown augmentation task"):
        build_transforms("keypoints", cfg, train=True, image_size=32)


def test_write_preview_is_reproducible(tmp_path):
    data = DataConfig(
        shapes=ShapesConfig(image_size=48, num_train=4, num_val=1, num_test=1, min_size=10, max_size=24)
    )
    ingest("shapes", tmp_path / "shapes", cfg=data)
    cfg = AugmentConfig(preview_samples=3)
    a = write_preview(tmp_path / "shapes", cfg, tmp_path / "a")
    b = write_preview(tmp_path / "shapes", cfg, tmp_path / "b")
    assert a["presets"] == {"detection": "yolo", "segmentation": "basic", "classification": "basic"}
    for pa, pb in zip(a["previews"], b["previews"], strict=True):
        assert open(pa, "rb").read() == open(pb, "rb").read()
    policy = json.loads((tmp_path / "a" / "policy.json").read_text())
    assert policy["seed"] == 0 and "SanitizeBoundingBoxes" in policy["presets"]["detection"]["train"]
    assert (tmp_path / "a" / "policy.json").read_text() == (
        tmp_path / "b" / "policy.json"
    ).read_text().replace(str(tmp_path / "b"), str(tmp_path / "a"))


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    preset=st.sampled_from(["basic", "elastic"]),
    hflip=st.sampled_from([0.0, 1.0]),
)
def test_segmentation_mask_moves_with_the_image(seed, preset, hflip):
    """Paint the class index into the image itself: after the preset, image and mask still agree."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 4, (6, 6), generator=g)
    mask = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)  # 48x48 of 8x8 class blocks
    image = tv_tensors.Image((mask.float() / 3).expand(3, -1, -1).clone())
    cfg = AugmentConfig(segmentation=preset, hflip=hflip, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0)
    torch.manual_seed(seed)
    out_image, out_mask = build_transforms("segmentation", cfg, train=True, image_size=48)(
        image, tv_tensors.Mask(mask)
    )
    valid = out_mask != 255
    from_image = (out_image[0] * 3).round().long()
    agree = (from_image == out_mask)[valid].float().mean()
    # only pixels near block borders may differ (bilinear image vs nearest mask; the elastic field bends borders);
    # a mask that did not move with the image would agree on about 1/4 of the pixels
    assert agree > (0.85 if preset == "basic" else 0.7)
