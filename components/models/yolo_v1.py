"""YOLO v1 (Redmon et al., 2015), written here: detection as one regression over an S x S grid.

The image is divided into an ``S x S`` grid; every cell predicts ``B`` boxes ``(x, y, w, h)``
with a confidence ``c`` each, and ``C`` class probabilities, so the head's output is an
``S x S x (5B + C)`` tensor whose per-cell vector is laid out as in the lecture's slide:
``[x_1, y_1, w_1, h_1, c_1, ..., x_B, y_B, w_B, h_B, c_B, p_1, ..., p_C]``.

Box parameters are normalised to [0, 1]: ``x, y`` relative to the cell, ``w, h`` relative to
the image. The network's outputs go through a sigmoid (box, confidence) and a softmax (the
conditional class probabilities ``p_{i,c}``), so that the square roots of ``w, h`` in the loss
are defined everywhere; the loss itself is the lecture's multi-part squared loss
(:func:`yolo_v1_loss`), with the responsible predictor chosen by the highest IoU with the
target and that IoU (detached) as the confidence target.

The model honours the project's detection contract (torchvision's ``GeneralizedRCNN``): input
``list[Tensor[3, H, W]]`` in [0, 1]; in training ``model(images, targets)`` returns the loss
terms, in eval ``model(images)`` returns ``[{boxes (xyxy pixels), labels (1..K), scores}]``.
Resizing to ``image_size``, normalisation and the mapping of boxes back to each input's size
are torchvision's ``GeneralizedRCNNTransform``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms

from components.errors import ConfigError
from components.models.backbones import Backbone, build_backbone
from components.models.registry import passes_kwargs_to, register_model
from components.ops.boxes import elementwise_box_iou

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def fixed_size_transform(
    image_size: int, image_mean: Sequence[float], image_std: Sequence[float]
) -> GeneralizedRCNNTransform:
    """torchvision's detection input transform resizing every image to ``image_size x image_size``.

    It resizes images and their target boxes together, normalises with ``image_mean/std``,
    stacks the batch, and its ``postprocess`` maps predicted boxes back to each input's size.
    Shared by the detectors written here (YOLO v1, OverFeat, the sliding window).
    """
    return GeneralizedRCNNTransform(
        min_size=image_size,
        max_size=image_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
        size_divisible=1,
        fixed_size=(image_size, image_size),
    )


# --------------------------------------------------------------------------- boxes <-> grid


def encode_targets(
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    *,
    S: int,
    num_classes: int,
    image_size: tuple[int, int],
) -> Tensor:
    """Encode ground-truth boxes into YOLO's grid targets.

    Every box is assigned to the cell ``i`` holding its centre; its ``(x, y)`` are the centre's
    offsets inside that cell and ``(w, h)`` its size relative to the image, all in [0, 1]. The
    lecture assumes a cell holds at most one object centre: when several do, the largest box
    is kept (the others get no target in this image).

    Args:
        boxes: per image, Tensor[n, 4] xyxy in pixels of the (resized) image.
        labels: per image, Tensor[n] int64 in 1..num_classes.
        S: grid size.
        num_classes: C.
        image_size: (H, W) of the image the boxes live in.

    Returns:
        Tensor[N, S, S, 5 + C]: ``[x, y, w, h, 1_obj, p_1..p_C]`` per cell (row ``i`` along y,
        column ``j`` along x); zeros where ``1_obj = 0``.
    """
    height, width = image_size
    device = boxes[0].device if len(boxes) else torch.device("cpu")
    target = torch.zeros(len(boxes), S, S, 5 + num_classes, device=device)
    for n, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        if b.numel() == 0:
            continue
        b = b.to(target.dtype)
        cx = (b[:, 0] + b[:, 2]) / 2 / width
        cy = (b[:, 1] + b[:, 3]) / 2 / height
        w = (b[:, 2] - b[:, 0]).clamp(min=0) / width
        h = (b[:, 3] - b[:, 1]).clamp(min=0) / height
        col = (cx * S).floor().clamp(0, S - 1).long()
        row = (cy * S).floor().clamp(0, S - 1).long()
        # smallest first, so that the largest box of a cell is written last and kept
        for k in torch.argsort(w * h).tolist():
            i, j = row[k], col[k]
            target[n, i, j, 0] = cx[k] * S - j
            target[n, i, j, 1] = cy[k] * S - i
            target[n, i, j, 2] = w[k]
            target[n, i, j, 3] = h[k]
            target[n, i, j, 4] = 1.0
            target[n, i, j, 5:] = 0.0
            target[n, i, j, 5 + int(lab[k]) - 1] = 1.0
    return target


def decode_boxes(xywh: Tensor, *, image_size: tuple[int, int]) -> Tensor:
    """Map cell-relative ``(x, y, w, h)`` back to xyxy pixels; inverse of :func:`encode_targets`.

    Args:
        xywh: Tensor[..., S, S, 4], rows (y) then columns (x) of the grid, then the box.
        image_size: (H, W) in pixels.

    Returns:
        Tensor of the same shape, xyxy in pixels.
    """
    return _cells_to_xyxy(xywh, grid_dims=(-3, -2)) * _pixel_scale(image_size, xywh)


def _pixel_scale(image_size: tuple[int, int], like: Tensor) -> Tensor:
    height, width = image_size
    return torch.tensor([width, height, width, height], dtype=like.dtype, device=like.device)


def _cells_to_xyxy(xywh: Tensor, *, grid_dims: tuple[int, int]) -> Tensor:
    """Cell-relative ``(x, y, w, h)`` to xyxy in units of the image (0..1).

    ``grid_dims`` name the row (y) and column (x) dimensions of ``xywh`` (last dim = 4).
    """
    S = xywh.shape[grid_dims[0]]
    shape = [1] * xywh.dim()
    rows = torch.arange(S, device=xywh.device, dtype=xywh.dtype)
    row_shape, col_shape = list(shape), list(shape)
    row_shape[grid_dims[0]] = S
    col_shape[grid_dims[1]] = S
    row_shape, col_shape = row_shape[:-1], col_shape[:-1]
    cx = (xywh[..., 0] + rows.view(col_shape)) / S
    cy = (xywh[..., 1] + rows.view(row_shape)) / S
    w, h = xywh[..., 2], xywh[..., 3]
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


# --------------------------------------------------------------------------- the loss


def yolo_v1_loss(
    pred: Tensor,
    target: Tensor,
    *,
    B: int,
    lambda_coord: float,
    lambda_obj: float,
    lambda_noobj: float,
    lambda_classes: float,
) -> dict[str, Tensor]:
    """The lecture's multi-part squared loss, term by term, averaged over the batch.

    With ``1_i^obj`` (cell i holds an object centre), ``1_ij^obj`` (box j of cell i is the
    responsible predictor: the highest IoU with the target) and ``c_ij`` that IoU (detached)::

        lambda_coord   sum_i sum_j 1_ij^obj [(x_i - x^_ij)^2 + (y_i - y^_ij)^2
                                             + (sqrt w_i - sqrt w^_ij)^2 + (sqrt h_i - sqrt h^_ij)^2]
      + lambda_obj     sum_i sum_j 1_ij^obj (c_ij - c^_ij)^2
      + lambda_noobj   sum_i sum_j (1 - 1_ij^obj) c^_ij^2
      + lambda_classes sum_i 1_i^obj sum_c (p_ic - p^_ic)^2

    Args:
        pred: Tensor[N, S, S, 5B + C], the network's outputs after their activations
            (box and confidence in [0, 1], ``p^`` probabilities).
        target: Tensor[N, S, S, 5 + C] from :func:`encode_targets`.
        B: boxes per cell.
        lambda_coord, lambda_obj, lambda_noobj, lambda_classes: the weights of the four parts
            (:class:`YOLOv1` holds their defaults).

    Returns:
        ``{"loss_coord", "loss_obj", "loss_noobj", "loss_classes"}``, each already multiplied by
        its lambda and divided by N, so their sum is the lecture's loss per image.
    """
    n = pred.shape[0]
    boxes = pred[..., : 5 * B].reshape(*pred.shape[:3], B, 5)  # [N, S, S, B, 5]
    p_hat = pred[..., 5 * B :]
    xywh_hat, c_hat = boxes[..., :4], boxes[..., 4]
    xywh, obj, p = target[..., :4], target[..., 4], target[..., 5:]

    with torch.no_grad():  # the responsible predictor and the confidence target are not differentiated
        iou = elementwise_box_iou(
            _cells_to_xyxy(xywh_hat, grid_dims=(1, 2)),
            _cells_to_xyxy(xywh, grid_dims=(1, 2)).unsqueeze(3),
        )  # [N, S, S, B]
        best = iou.argmax(dim=-1, keepdim=True)
        resp = torch.zeros_like(iou).scatter_(-1, best, 1.0) * obj.unsqueeze(-1)  # 1_ij^obj

    t = xywh.unsqueeze(3)  # [N, S, S, 1, 4]
    coord = (
        (t[..., 0] - xywh_hat[..., 0]) ** 2
        + (t[..., 1] - xywh_hat[..., 1]) ** 2
        + (t[..., 2].clamp(min=0).sqrt() - xywh_hat[..., 2].clamp(min=0).sqrt()) ** 2
        + (t[..., 3].clamp(min=0).sqrt() - xywh_hat[..., 3].clamp(min=0).sqrt()) ** 2
    )
    return {
        "loss_coord": lambda_coord * (resp * coord).sum() / n,
        "loss_obj": lambda_obj * (resp * (iou - c_hat) ** 2).sum() / n,
        "loss_noobj": lambda_noobj * ((1 - resp) * c_hat**2).sum() / n,
        "loss_classes": lambda_classes * (obj.unsqueeze(-1) * (p - p_hat) ** 2).sum() / n,
    }


# --------------------------------------------------------------------------- the model


class YOLOv1Head(nn.Module):
    """Backbone features -> ``S x S x (5B + C)`` raw outputs.

    ``"fc"`` is the paper's and the lecture's head ("although the output comes from fully
    connected layers, it has a 2D structure"): a 1x1 reduction, pooling to ``S x S``, then two
    fully connected layers with dropout after the first one. ``"conv"`` keeps the 2D structure
    explicitly (3x3 conv, dropout, 1x1 conv per cell): fewer parameters, faster to train on small data.
    Leaky ReLU everywhere, as in the lecture. Measured on the shapes data (320 training images,
    10-12 epochs, 2 CPU cores): the ``"fc"`` head (2.3 M parameters) reached mAP@0.5 0.00, the
    ``"conv"`` head 0.45 (S = 8, 12 epochs) to 0.69 (16 epochs), hence ``"conv"`` by default. With
    flips as the only augmentation (``detect.yolo.augment: basic``), 16 epochs reach 0.81 / 0.73 on
    the test split (seeds 0 / 1), against 0.62 with the affine + crop ``yolo`` preset.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        S: int,
        B: int,
        num_classes: int,
        kind: str,
        hidden: int,
        dropout: float,
        leaky_slope: float,
    ):
        super().__init__()
        self.S, self.depth, self.kind = S, 5 * B + num_classes, kind
        if kind == "fc":
            reduced = 64
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, reduced, 1, bias=False),
                nn.BatchNorm2d(reduced),
                nn.LeakyReLU(leaky_slope, inplace=True),
                nn.AdaptiveAvgPool2d(S),
                nn.Flatten(),
                nn.Linear(reduced * S * S, hidden),
                nn.LeakyReLU(leaky_slope, inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, S * S * self.depth),
            )
        elif kind == "conv":
            self.body = nn.Sequential(
                nn.AdaptiveAvgPool2d(S),
                nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.LeakyReLU(leaky_slope, inplace=True),
                nn.Dropout2d(dropout),
                nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.LeakyReLU(leaky_slope, inplace=True),
                nn.Conv2d(hidden, self.depth, 1),
            )
        else:
            raise ValueError(f"unknown YOLO head {kind!r}; use 'fc' or 'conv'")

    def forward(self, features: Tensor) -> Tensor:
        """features: Tensor[N, C_in, h, w] -> Tensor[N, S, S, 5B + C] (raw, before activations)."""
        out = self.body(features)
        if self.kind == "fc":
            return out.view(-1, self.S, self.S, self.depth)
        return out.permute(0, 2, 3, 1)


class YOLOv1(nn.Module):
    """YOLO v1 on a project backbone; see the module docstring for the contract.

    Args:
        backbone: a :class:`Backbone`; its last (lowest resolution) feature map feeds the head.
        num_classes: K object classes (labels 1..K; no background class in YOLO).
        S, B: grid size and boxes per cell.
        image_size: every image is resized to ``image_size x image_size``.
        lambda_coord, lambda_obj, lambda_noobj, lambda_classes: loss weights.
        head, hidden, dropout, leaky_slope: see :class:`YOLOv1Head`.
        score_threshold, nms_iou, max_detections: decoding (class-specific confidence ``c * p``, NMS).
        image_mean, image_std: input normalisation (the backbone's pretraining statistics).
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        S: int = 7,
        B: int = 2,
        image_size: int = 128,
        lambda_coord: float = 5.0,
        lambda_obj: float = 1.0,
        lambda_noobj: float = 0.5,
        lambda_classes: float = 1.0,
        head: str = "conv",
        hidden: int = 128,
        dropout: float = 0.5,
        leaky_slope: float = 0.1,
        score_threshold: float = 0.05,
        nms_iou: float = 0.5,
        max_detections: int = 100,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        feature_map = image_size // backbone.strides[-1]
        if S > max(feature_map, 1):
            raise ConfigError(
                f"YOLO grid S={S} is finer than the backbone's last feature map ({feature_map}x{feature_map} for "
                f"{image_size} px images at stride {backbone.strides[-1]}): neighbouring cells would see the same features",
                file="params.yaml",
                record="detect.yolo.S",
                fix=f"set detect.yolo.S <= {feature_map}, or raise detect.yolo.image_size to at least {S * backbone.strides[-1]}",
            )
        self.backbone = backbone
        self.transform = fixed_size_transform(image_size, image_mean, image_std)
        self.head = YOLOv1Head(
            backbone.out_channels,
            S=S,
            B=B,
            num_classes=num_classes,
            kind=head,
            hidden=hidden,
            dropout=dropout,
            leaky_slope=leaky_slope,
        )
        self.S, self.B, self.num_classes, self.image_size = S, B, num_classes, image_size
        self.lambdas = {
            "lambda_coord": lambda_coord,
            "lambda_obj": lambda_obj,
            "lambda_noobj": lambda_noobj,
            "lambda_classes": lambda_classes,
        }
        self.score_threshold, self.nms_iou, self.max_detections = score_threshold, nms_iou, max_detections

    def predict_grid(self, batch: Tensor) -> Tensor:
        """Normalised batch Tensor[N, 3, H, W] -> Tensor[N, S, S, 5B + C] after activations."""
        raw = self.head(self.backbone.forward_features(batch))
        boxes = torch.sigmoid(raw[..., : 5 * self.B])
        classes = torch.softmax(raw[..., 5 * self.B :], dim=-1)
        return torch.cat([boxes, classes], dim=-1)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: the loss terms of :func:`yolo_v1_loss`; eval: per image ``{boxes, labels, scores}``."""
        if self.training and targets is None:
            raise ValueError("YOLOv1 in training mode needs targets")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        pred = self.predict_grid(image_list.tensors)
        size = tuple(image_list.tensors.shape[-2:])
        if self.training:
            assert targets is not None
            target = encode_targets(
                [t["boxes"] for t in targets],
                [t["labels"] for t in targets],
                S=self.S,
                num_classes=self.num_classes,
                image_size=size,
            )
            return yolo_v1_loss(pred, target, B=self.B, **self.lambdas)
        detections = self.decode(pred, image_size=size)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    @torch.no_grad()
    def decode(self, pred: Tensor, *, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Grid outputs -> detections: class-specific confidence ``c_ij * p_ic``, threshold, per-class NMS.

        Args:
            pred: Tensor[N, S, S, 5B + C] after activations.
            image_size: (H, W) of the network input, in pixels.
        """
        n, S, B, C = pred.shape[0], self.S, self.B, self.num_classes
        boxes = pred[..., : 5 * B].reshape(n, S, S, B, 5)
        xyxy = _cells_to_xyxy(boxes[..., :4], grid_dims=(1, 2)) * _pixel_scale(image_size, pred)
        xyxy[..., 0::2] = xyxy[..., 0::2].clamp(0, image_size[1])
        xyxy[..., 1::2] = xyxy[..., 1::2].clamp(0, image_size[0])
        scores = boxes[..., 4:5] * pred[..., 5 * B :].unsqueeze(3)  # [N, S, S, B, C]
        out = []
        for k in range(n):
            s = scores[k].reshape(-1)
            keep = torch.nonzero(s > self.score_threshold).squeeze(1)
            box_idx, cls = keep // C, keep % C
            b = xyxy[k].reshape(-1, 4)[box_idx]
            sk = s[keep]
            valid = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            b, sk, cls = b[valid], sk[valid], cls[valid]
            kept = batched_nms(b, sk, cls, self.nms_iou)[: self.max_detections]
            out.append({"boxes": b[kept], "scores": sk[kept], "labels": cls[kept] + 1})
        return out


@register_model("detection", "yolo")
@passes_kwargs_to(YOLOv1)
def yolo_v1(
    *,
    num_classes: int,
    backbone: str = "convnet_small",
    weights_backbone: str | None = None,
    trainable_backbone_layers: int | None = None,
    **kwargs: Any,
) -> YOLOv1:
    """YOLO v1 on a project backbone (``weights_backbone``: None, a torchvision enum name or a checkpoint path).

    Detection contract: ``list[Tensor[3,H,W]]`` in [0, 1]; training ``model(images, targets)`` ->
    ``{loss_coord, loss_obj, loss_noobj, loss_classes}``; eval -> ``[{boxes xyxy pixels, labels 1..K, scores}]``.

    Args:
        num_classes: K object classes.
        backbone, weights_backbone, trainable_backbone_layers: the backbone, as in :func:`build_backbone`.
        **kwargs: passed to :class:`YOLOv1` (``S``, ``B``, ``image_size``, the lambdas, ...).
    """
    body = build_backbone(backbone, weights=weights_backbone, trainable_layers=trainable_backbone_layers)
    return YOLOv1(body, num_classes=num_classes, **kwargs)
