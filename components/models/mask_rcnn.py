"""Mask R-CNN (He et al. 2017) on the project's backbone + FPN: instance segmentation.

The lecture: Mask R-CNN extends Faster R-CNN; the RoI pooling layer is replaced with an RoI
alignment layer (``torchvision.ops.MultiScaleRoIAlign``, bilinear sampling, no quantisation of the
RoI's coordinates), and it branches off to a small FCN (the mask head) predicting a 28x28 mask per
RoI and class. Detection combined with mask prediction gives instance segmentation.

We re-use ``torchvision.models.detection.MaskRCNN`` (RPN, RoI heads, losses, post-processing) and
give it OUR multi-level backbone with a feature pyramid network on top (:class:`BackboneWithFPN`),
with anchors, head widths and proposal counts sized for small images on a CPU.

Contract (detection, plus masks): input ``list[Tensor[3, H, W]]`` in [0, 1]; training
``model(images, targets) -> {loss_classifier, loss_box_reg, loss_mask, loss_objectness,
loss_rpn_box_reg}`` with targets ``{boxes xyxy pixels, labels int64 1..K, masks uint8 [N, H, W]}``;
eval ``model(images) -> [{boxes, labels, scores, masks [N, 1, H, W] probabilities}]``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from components.errors import ConfigError
from components.models.backbones import Backbone, build_backbone
from components.models.fcn import IMAGENET_MEAN, IMAGENET_STD
from components.models.registry import passes_kwargs_to, register_model


class BackboneWithFPN(nn.Module):
    """Our multi-level backbone followed by a feature pyramid network (torchvision's FPN).

    Args:
        backbone: multi-level backbone (``forward -> OrderedDict{"0".."L-1"}``).
        out_channels: channels of every pyramid level.
        min_stride: backbone stages with a smaller stride are not used (a stride-2 map is costly
            for the RPN and adds nothing for objects of 16 pixels or more).

    Shapes:
        ``[N, 3, H, W] -> OrderedDict{"0".."P-1", "pool"}`` of ``[N, out_channels, H / s, W / s]``
        for the used strides ``s`` and one extra max-pooled level (stride ``2 * max(s)``).
    """

    def __init__(self, backbone: Backbone, *, out_channels: int = 64, min_stride: int = 4):
        super().__init__()
        self.body = backbone
        self.levels = [i for i, s in enumerate(backbone.strides) if s >= min_stride]
        if not self.levels:
            raise ConfigError(
                f"{backbone.arch} has no stage of stride >= {min_stride}", record="backbone.arch"
            )
        self.strides = [backbone.strides[i] for i in self.levels] + [2 * backbone.strides[self.levels[-1]]]
        self.fpn = FeaturePyramidNetwork(
            [backbone.channels[i] for i in self.levels], out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels

    @property
    def featmap_names(self) -> list[str]:
        """Names of the pyramid levels RoIAlign samples from (the max-pooled level is only for the RPN)."""
        return [str(i) for i in range(len(self.levels))]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:  # noqa: D102
        feats = list(self.body(x).values())
        return self.fpn(OrderedDict((str(j), feats[i]) for j, i in enumerate(self.levels)))


def build_mask_rcnn(
    backbone: Backbone,
    num_classes: int,
    *,
    image_size: int = 128,
    fpn_channels: int = 64,
    head_channels: int = 64,
    representation_size: int = 256,
    score_threshold: float = 0.05,
    rpn_pre_nms_top_n: int = 600,
    rpn_post_nms_top_n: int = 300,
    box_batch_size_per_image: int = 128,
    max_detections: int = 100,
) -> MaskRCNN:
    """torchvision's MaskRCNN around :class:`BackboneWithFPN`, sized for small images.

    Args:
        backbone: our multi-level backbone.
        num_classes: K + 1 (torchvision's convention: background included).
        image_size: images are resized so that their shorter side is this (no resize for the
            dataset's own size); anchors are 4 x stride per pyramid level (16..128 px at 128).
        fpn_channels: channels of the pyramid.
        head_channels: channels of the four 3x3 convolutions of the mask head (the FCN branch).
        representation_size: width of the box head's two fully connected layers.
        score_threshold: detections below this score are dropped in eval.
        rpn_pre_nms_top_n, rpn_post_nms_top_n: proposals kept before / after the RPN's NMS
            (train; half of them in eval).
        box_batch_size_per_image: RoIs sampled per image for the box and mask losses.
        max_detections: detections kept per image.
    """
    body = BackboneWithFPN(backbone, out_channels=fpn_channels)
    sizes = tuple((4 * s,) for s in body.strides)
    anchor_generator = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
    names = body.featmap_names
    box_roi_pool = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
    mask_roi_pool = MultiScaleRoIAlign(featmap_names=names, output_size=14, sampling_ratio=2)
    box_head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
    mask_head = MaskRCNNHeads(fpn_channels, [head_channels] * 4, 1)
    mask_predictor = MaskRCNNPredictor(head_channels, head_channels, num_classes)
    return MaskRCNN(
        body,
        min_size=image_size,
        max_size=max(image_size, 2 * image_size),
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        rpn_anchor_generator=anchor_generator,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n,
        rpn_pre_nms_top_n_test=max(1, rpn_pre_nms_top_n // 2),
        rpn_post_nms_top_n_train=rpn_post_nms_top_n,
        rpn_post_nms_top_n_test=max(1, rpn_post_nms_top_n // 2),
        box_roi_pool=box_roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        box_score_thresh=score_threshold,
        box_batch_size_per_image=box_batch_size_per_image,
        box_detections_per_img=max_detections,
        mask_roi_pool=mask_roi_pool,
        mask_head=mask_head,
        mask_predictor=mask_predictor,
    )


@register_model("segmentation")
@passes_kwargs_to(build_mask_rcnn)
def mask_rcnn(
    *,
    num_classes: int,
    backbone_arch: str = "convnet_small",
    backbone_weights: str | None = None,
    trainable_layers: int | None = None,
    **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN on a project backbone + FPN: the detection contract plus ``masks`` (see the module docstring).

    Args:
        num_classes: K + 1 (background included).
        backbone_arch: a registered backbone.
        backbone_weights: None (random), a torchvision enum name or a checkpoint path.
        trainable_layers: backbone stages left trainable (None = all).
        **kwargs: passed to :func:`build_mask_rcnn` (``image_size``, ``fpn_channels``, ``head_channels``, ...).
    """
    backbone = build_backbone(backbone_arch, weights=backbone_weights, trainable_layers=trainable_layers)
    return build_mask_rcnn(backbone, num_classes, **kwargs)
