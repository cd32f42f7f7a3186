"""Faster R-CNN and RetinaNet from ``torchvision.models.detection`` on the project's backbone + FPN.

* **Faster R-CNN** (Ren et al., 2015), the two-stage detector: "Faster R-CNN replaces selective
  search with a region proposal network". Our multi-level backbone feeds a feature pyramid
  network (:class:`components.models.mask_rcnn.BackboneWithFPN`, torchvision's FPN over every
  level of stride >= 4 plus a max-pooled one); the RPN proposes regions from anchors of
  ``anchor_scale x stride`` pixels per level, ``MultiScaleRoIAlign`` pools a 7x7 map per proposal
  from the pyramid level that fits its size, and a two-layer head classifies (K + 1 classes) and
  regresses the box per class.
* **RetinaNet** (Lin et al., 2017), one stage with the focal loss: dense classification and box
  regression subnets over the same kind of pyramid (here from stride 8), 9 anchors per location.

Both follow torchvision's detection contract, which is the project's: ``list[Tensor[3, H, W]]``
in [0, 1]; training returns a loss dict, eval ``[{boxes (xyxy pixels), labels (1..K), scores}]``.
Images are resized so that their longer side is ``image_size`` (aspect ratio kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign

from components.errors import ConfigError
from components.models.backbones import build_backbone
from components.models.mask_rcnn import BackboneWithFPN
from components.models.registry import register_model
from components.models.yolo_v1 import IMAGENET_MEAN, IMAGENET_STD


def _anchor_sizes(strides: Sequence[int], anchor_scale: float, octaves: int) -> tuple[tuple[float, ...], ...]:
    """Anchor sizes per pyramid level: ``anchor_scale * stride * 2^(k / octaves)``, k = 0..octaves-1."""
    return tuple(tuple(anchor_scale * s * 2 ** (k / octaves) for k in range(octaves)) for s in strides)


@register_model("detection", "faster_rcnn")
def faster_rcnn(
    *,
    num_classes: int,
    backbone: str = "convnet_small",
    weights_backbone: str | None = None,
    trainable_backbone_layers: int | None = None,
    image_size: int = 128,
    min_stride: int = 4,
    fpn_channels: int = 64,
    representation_size: int = 256,
    anchor_scale: float = 4.0,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_pre_nms_top_n: int = 500,
    rpn_post_nms_top_n: int = 200,
    box_batch_size_per_image: int = 128,
    score_threshold: float = 0.05,
    nms_iou: float = 0.5,
    max_detections: int = 100,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> FasterRCNN:
    """Faster R-CNN with FPN, RPN and MultiScaleRoIAlign on our backbone.

    Detection contract: ``list[Tensor[3,H,W]]`` in [0, 1]; training -> ``{loss_classifier,
    loss_box_reg, loss_objectness, loss_rpn_box_reg}``; eval -> ``[{boxes xyxy pixels, labels 1..K, scores}]``.

    Args:
        num_classes: K object classes (the box predictor has K + 1 outputs, 0 = background).
        min_stride: backbone levels with a smaller stride are left out of the pyramid.
        fpn_channels: channels of every pyramid level; representation_size: the box head's width.
        anchor_scale, aspect_ratios: RPN anchors of ``anchor_scale x stride`` pixels per level.
        rpn_pre_nms_top_n, rpn_post_nms_top_n: proposals kept before / after the RPN's NMS in
            training (half in eval); box_batch_size_per_image: RoIs sampled per image for the head.
    """
    body = BackboneWithFPN(
        build_backbone(backbone, weights=weights_backbone, trainable_layers=trainable_backbone_layers),
        out_channels=fpn_channels,
        min_stride=min_stride,
    )
    sizes = _anchor_sizes(body.strides, anchor_scale, octaves=1)
    return FasterRCNN(
        body,
        min_size=image_size,
        max_size=image_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
        rpn_anchor_generator=AnchorGenerator(sizes=sizes, aspect_ratios=(tuple(aspect_ratios),) * len(sizes)),
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n,
        rpn_pre_nms_top_n_test=max(1, rpn_pre_nms_top_n // 2),
        rpn_post_nms_top_n_train=rpn_post_nms_top_n,
        rpn_post_nms_top_n_test=max(1, rpn_post_nms_top_n // 2),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=body.featmap_names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        box_batch_size_per_image=box_batch_size_per_image,
        box_score_thresh=score_threshold,
        box_nms_thresh=nms_iou,
        box_detections_per_img=max_detections,
    )


@register_model("detection", "retinanet")
def retinanet(
    *,
    num_classes: int,
    backbone: str = "convnet_small",
    weights_backbone: str | None = None,
    trainable_backbone_layers: int | None = None,
    image_size: int = 128,
    min_stride: int = 8,
    fpn_channels: int = 64,
    anchor_scale: float = 3.0,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    head_groups: int = 16,
    score_threshold: float = 0.05,
    nms_iou: float = 0.5,
    max_detections: int = 100,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> RetinaNet:
    """RetinaNet (focal loss) with FPN on our backbone.

    Detection contract: ``list[Tensor[3,H,W]]`` in [0, 1]; training -> ``{classification,
    bbox_regression}``; eval -> ``[{boxes xyxy pixels, labels 1..K, scores}]``.

    Args:
        num_classes: K object classes (the classification subnet has K + 1 outputs; 0 never fires).
        min_stride: backbone levels with a smaller stride are left out of the pyramid.
        fpn_channels: channels of the pyramid and of the two subnets' four 3x3 convolutions.
        anchor_scale, aspect_ratios: 3 octave scales ``anchor_scale x stride x 2^(k/3)`` times the ratios.
        head_groups: GroupNorm groups after each of the subnets' 3x3 convolutions (torchvision's
            RetinaNet v2 head); 0 keeps the paper's head without normalisation. Without it, the four
            convolutions initialised at std 0.01 learned where objects are but not which class on the
            shapes data (test mAP@0.5 0.20 with the class scores of a box nearly equal for every
            class; 0.29 with 16 groups, same 8 epochs).
    """
    body = BackboneWithFPN(
        build_backbone(backbone, weights=weights_backbone, trainable_layers=trainable_backbone_layers),
        out_channels=fpn_channels,
        min_stride=min_stride,
    )
    sizes = _anchor_sizes(body.strides, anchor_scale, octaves=3)
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=(tuple(aspect_ratios),) * len(sizes))
    if head_groups > 0 and fpn_channels % head_groups:
        raise ConfigError(
            f"GroupNorm needs fpn_channels ({fpn_channels}) divisible by head_groups ({head_groups})",
            record="detect.retinanet.head_groups",
            fix="pick a divisor of fpn_channels, or 0 for no normalisation",
        )
    norm_layer = partial(nn.GroupNorm, head_groups) if head_groups > 0 else None
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes + 1, norm_layer=norm_layer)
    return RetinaNet(
        body,
        num_classes + 1,
        min_size=image_size,
        max_size=image_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
        anchor_generator=anchors,
        head=head,
        score_thresh=score_threshold,
        nms_thresh=nms_iou,
        detections_per_img=max_detections,
    )
