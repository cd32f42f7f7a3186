"""SSD (Liu et al., 2015) on a project backbone, through ``torchvision.models.detection.SSD``.

"SSD improves upon YOLO by using a fully-convolutional architecture and multi-scale maps":
several levels of our backbone plus extra stride-2 blocks give feature maps from fine to
coarse; each map carries default boxes (torchvision's ``DefaultBoxGenerator``, scales spread
linearly from ``min_scale`` to ``max_scale`` of the image) and a 3x3 convolutional head
predicts, per default box, K + 1 class scores (0 = background) and the box offsets. Matching,
hard-negative mining (3 negatives per positive), the loss and the decoding are torchvision's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead

from components.models.backbones import Backbone, build_backbone
from components.models.registry import register_model
from components.models.yolo_v1 import IMAGENET_MEAN, IMAGENET_STD


class SSDFeatures(nn.Module):
    """Multi-scale feature maps for SSD: backbone levels, then extra blocks each halving the resolution.

    Args:
        body: the backbone.
        levels: indices of the backbone levels to use (negative counts from the last).
        extra_blocks: how many extra (1x1 reduce, 3x3 stride-2) blocks to append after the last level.
    """

    def __init__(self, body: Backbone, *, levels: Sequence[int], extra_blocks: int):
        super().__init__()
        n = len(body.channels)
        self.body = body
        self.levels = [lvl % n for lvl in levels]
        if sorted(set(self.levels)) != self.levels:
            raise ValueError(f"SSD feature levels must be distinct and increasing, got {list(levels)}")
        self.channels = [body.channels[lvl] for lvl in self.levels]
        extras = []
        c = self.channels[-1]
        for _ in range(extra_blocks):
            extras.append(
                nn.Sequential(  # as SSD's extra layers: no normalisation, so 1x1 maps and batches of 1 work
                    nn.Conv2d(c, c // 2, 1),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(c // 2, c, 3, stride=2, padding=1),
                    nn.ReLU(inplace=True),
                )
            )
            self.channels.append(c)
        self.extras = nn.ModuleList(extras)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Tensor[N, 3, H, W] -> the maps from fine to coarse, keys ``"0"``, ``"1"``, ..."""
        feats = self.body(x)
        out = [feats[str(lvl)] for lvl in self.levels]
        y = out[-1]
        for block in self.extras:
            y = block(y)
            out.append(y)
        return OrderedDict((str(i), f) for i, f in enumerate(out))


@register_model("detection", "ssd")
def ssd(
    *,
    num_classes: int,
    backbone: str = "convnet_small",
    weights_backbone: str | None = None,
    trainable_backbone_layers: int | None = None,
    image_size: int = 128,
    feature_levels: Sequence[int] = (-2, -1),
    extra_blocks: int = 2,
    aspect_ratios: Sequence[float] = (2.0,),
    min_scale: float = 0.1,
    max_scale: float = 0.9,
    score_threshold: float = 0.05,
    nms_iou: float = 0.5,
    max_detections: int = 100,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> SSD:
    """SSD with our backbone: multi-scale maps, default boxes, per-map 3x3 conv head.

    Detection contract: ``list[Tensor[3,H,W]]`` in [0, 1]; training -> ``{bbox_regression,
    classification}``; eval -> ``[{boxes xyxy pixels, labels 1..K, scores}]``.

    Args:
        num_classes: K object classes (the head has K + 1 outputs, 0 = background).
        feature_levels: backbone levels feeding the head; extra_blocks: coarser maps appended.
        aspect_ratios: default-box aspect ratios (each r adds r and 1/r to the two square boxes).
        min_scale, max_scale: the default-box scales of the finest and the coarsest map, as a
            fraction of the image side.
    """
    body = build_backbone(backbone, weights=weights_backbone, trainable_layers=trainable_backbone_layers)
    features = SSDFeatures(body, levels=feature_levels, extra_blocks=extra_blocks)
    n_maps = len(features.channels)
    anchors = DefaultBoxGenerator([list(aspect_ratios)] * n_maps, min_ratio=min_scale, max_ratio=max_scale)
    head = SSDHead(features.channels, anchors.num_anchors_per_location(), num_classes + 1)
    model = SSD(
        features,
        anchors,
        (image_size, image_size),
        num_classes + 1,
        image_mean=list(image_mean),
        image_std=list(image_std),
        head=head,
        score_thresh=score_threshold,
        nms_thresh=nms_iou,
        detections_per_img=max_detections,
    )
    _init_extras(features)
    return model


def _init_extras(features: SSDFeatures) -> None:
    """He initialisation of the extra blocks (torchvision's SSD leaves it to its own VGG extras)."""
    for m in features.extras.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
