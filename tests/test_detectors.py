"""Every registered detector: a typed keyword-only builder, trains (loss falls) and returns valid boxes.

The same contract for all (torchvision's GeneralizedRCNN): ``list[Tensor[3, H, W]]`` in [0, 1];
training returns a loss dict, eval ``[{boxes xyxy pixels, labels 1..K, scores}]``. The tests are
parametrised over the registry (``list_models("detection")``, torchvision's and timm's
``test_models.py``), so a detector is tested the moment it is registered.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from components.errors import DataError
from components.models import get_model, get_model_builder, list_models

K = 3
ARCHS = list_models("detection")
# small heads so that a few steps on CPU take seconds (a newly registered detector gets its defaults)
TINY = {
    "sliding_window": {"window_sizes": [24], "crop_size": 16},
    "overfeat": {"window_size": 32, "head_channels": 32, "scales": [1.0]},
    "yolo": {"S": 4, "head": "conv", "hidden": 32, "dropout": 0.0},
    "faster_rcnn": {
        "fpn_channels": 16,
        "representation_size": 64,
        "rpn_pre_nms_top_n": 100,
        "rpn_post_nms_top_n": 50,
        "box_batch_size_per_image": 32,
    },
    "retinanet": {"fpn_channels": 16},
}
STEPS, LR = 12, 1e-3
# RetinaNet's focal loss spikes in its first steps (the stage warms up and clips for it too: params' retinanet.train)
TRAIN = {"retinanet": {"steps": 20, "lr": 5e-4, "clip": 10.0}}
# Selective-search detectors train on their own toy scenes and recipes (minutes here otherwise)
TRAINED_ELSEWHERE = {"rcnn": "tests/test_rcnn_lineage.py", "fast_rcnn": "tests/test_rcnn_lineage.py"}


def _trainable(arch: str) -> object:
    if arch in TRAINED_ELSEWHERE:
        return pytest.param(arch, marks=pytest.mark.skip(reason=f"trained in {TRAINED_ELSEWHERE[arch]}"))
    return arch


def _scene(seed: int, size: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A dark image with two bright filled rectangles of classes 1 and 3."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, size, size, generator=g) * 0.2
    boxes = torch.tensor([[6.0, 8.0, 30.0, 34.0], [34.0, 30.0, 60.0, 58.0]])
    image[0, 8:34, 6:30] = 0.9
    image[2, 30:58, 34:60] = 0.9
    return image, {"boxes": boxes, "labels": torch.tensor([1, 3])}


def test_the_detection_track_is_registered():
    assert {"sliding_window", "overfeat", "yolo", "ssd", "faster_rcnn", "retinanet", "rcnn", "fast_rcnn"} <= set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_builder_is_keyword_only_typed_and_takes_the_common_arguments(arch):
    params = inspect.signature(get_model_builder("detection", arch)).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values()), arch
    assert {
        "num_classes",
        "backbone",
        "weights_backbone",
        "trainable_backbone_layers",
        "image_size",
        "score_threshold",
        "max_detections",
    } <= set(params), arch
    assert all(p.annotation is not inspect.Parameter.empty for p in params.values()), arch


@pytest.mark.parametrize("arch", ARCHS)
def test_unknown_builder_argument_is_refused(arch):
    with pytest.raises(TypeError, match="no_such_argument"):
        get_model("detection", arch, num_classes=K, no_such_argument=1)


def _probe_loss(model, images, targets) -> float:
    """The training loss with a fixed seed, so that the samplers (RPN, RoI, negatives) draw the same windows."""
    torch.manual_seed(123)
    with torch.no_grad():
        return sum(model(images, targets).values()).item()


@pytest.mark.parametrize("arch", [_trainable(a) for a in ARCHS])
def test_trains_a_few_steps_with_falling_loss_and_returns_valid_boxes(arch):
    torch.manual_seed(0)
    model = get_model(
        "detection", arch, num_classes=K, image_size=64, score_threshold=0.0, max_detections=20, **TINY.get(arch, {})
    )
    image, target = _scene(0)
    images, targets = [image], [target]
    recipe = TRAIN.get(arch, {})
    steps, clip = recipe.get("steps", STEPS), recipe.get("clip")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=recipe.get("lr", LR))
    model.train()
    before = _probe_loss(model, images, targets)
    for _ in range(steps):
        loss_dict = model(images, targets)
        assert all(torch.isfinite(v) for v in loss_dict.values()), loss_dict
        optimizer.zero_grad()
        sum(loss_dict.values()).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    after = _probe_loss(model, images, targets)
    assert after < 0.7 * before, f"{arch}: loss {before:.3f} -> {after:.3f} after {steps} steps"

    model.eval()
    odd = torch.rand(3, 48, 80)  # another size: boxes come back in its own pixels
    with torch.no_grad():
        outputs = model([image, odd])
    for out, (h, w) in zip(outputs, [(64, 64), (48, 80)], strict=True):
        boxes, labels, scores = out["boxes"], out["labels"], out["scores"]
        n = len(boxes)
        assert boxes.shape == (n, 4) and labels.shape == (n,) and scores.shape == (n,)
        assert n <= 20
        assert labels.dtype == torch.int64 and (n == 0 or (labels.min() >= 1 and labels.max() <= K))
        assert torch.isfinite(boxes).all() and torch.isfinite(scores).all()
        assert torch.all((scores >= 0) & (scores <= 1))
        assert torch.all(boxes[:, 2] >= boxes[:, 0]) and torch.all(boxes[:, 3] >= boxes[:, 1])
        assert torch.all(boxes[:, 0::2] >= -1e-3) and torch.all(boxes[:, 0::2] <= w + 1e-3)
        assert torch.all(boxes[:, 1::2] >= -1e-3) and torch.all(boxes[:, 1::2] <= h + 1e-3)
    assert len(outputs[0]["boxes"]) > 0, f"{arch} found nothing on a training image"


@pytest.mark.parametrize("arch", ARCHS)
def test_training_mode_without_targets_is_refused(arch):
    model = get_model("detection", arch, num_classes=K, image_size=64, **TINY.get(arch, {}))
    model.train()
    # ours raise ValueError / DataError; torchvision's detectors torch._assert (AssertionError)
    with pytest.raises((ValueError, DataError, AssertionError), match="targets"):
        model([torch.rand(3, 64, 64)])


def test_retinanet_subnets_are_group_normalised_and_indivisible_groups_are_a_config_error():
    from torch import nn

    from components.errors import ConfigError

    model = get_model("detection", "retinanet", num_classes=K, fpn_channels=16, head_groups=8)
    norms = [m for m in model.head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 8 and all(m.num_groups == 8 for m in norms)  # 4 convolutions in each of the 2 subnets
    plain = get_model("detection", "retinanet", num_classes=K, fpn_channels=16, head_groups=0)
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.modules())
    with pytest.raises(ConfigError, match="divisible") as info:
        get_model("detection", "retinanet", num_classes=K, fpn_channels=24, head_groups=16)
    assert info.value.record == "detect.retinanet.head_groups"


def test_faster_rcnn_anchors_and_box_head_are_params():
    """Every key of detect.faster_rcnn reaches the builder: anchors sized for the data's objects."""
    from components.config import FasterRCNNConfig
    from components.stages.detect import build_detector

    acfg = FasterRCNNConfig.model_validate(
        {"backbone": {"arch": "convnet_small", "weights": None}, "anchor_scale": 2.0, "aspect_ratios": [1.0], "representation_size": 32}
    )
    model, args = build_detector("faster_rcnn", acfg, num_classes=2)
    assert args["anchor_scale"] == 2.0 and args["representation_size"] == 32
    generator = model.rpn.anchor_generator
    assert all(len(r) == 1 for r in generator.aspect_ratios)
    strides = model.backbone.strides
    assert [s[0] for s in generator.sizes] == [int(2.0 * s) for s in strides]
    assert model.roi_heads.box_head.fc6.out_features == 32
