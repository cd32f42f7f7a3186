"""The lecture's first detectors: the sliding-window baseline and OverFeat (Sermanet et al., 2013).

* :class:`SlidingWindowDetector`: "the simplest strategy to move from image classification to
  object detection is to classify local regions, at multiple scales and locations". The
  pretrained classifier, with an added background class, classifies every window of a grid of
  sizes and positions (each window resized to the classifier's input size), then per-class NMS.
  Its cost grows with the number of windows: :attr:`SlidingWindowDetector.windows_per_image`.
* :class:`OverFeat`: the same classifier made fully convolutional, evaluated densely over the
  whole image at several scales (one pass per scale instead of one per window), plus a
  box-regression head predicting ``(x, y, w, h)`` relative to each window. As in the lecture,
  the regression head is trained with an l2 loss while the convolutional layers stay fixed
  (it reads detached features), negatives come from random windows and from hard-negative
  mining, and the boxes are merged with the ad-hoc greedy procedure (:func:`greedy_merge`).

Both honour the project's detection contract: ``list[Tensor[3, H, W]]`` in [0, 1]; training
returns a loss dict, eval ``[{boxes (xyxy pixels), labels (1..K), scores}]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, roi_align

from components.models.backbones import Backbone, build_backbone
from components.models.registry import passes_kwargs_to, register_model
from components.models.yolo_v1 import IMAGENET_MEAN, IMAGENET_STD, fixed_size_transform

# --------------------------------------------------------------------------- windows


def sliding_windows(
    image_size: tuple[int, int], window_sizes: Sequence[int], stride_fraction: float
) -> Tensor:
    """Every square window of every size, at a stride of ``stride_fraction * size``, covering the image.

    The last window of a row or column is aligned to the image border so that no strip is left out.

    Returns:
        Tensor[W, 4] xyxy pixels (float).
    """
    height, width = image_size
    out = []
    for size in window_sizes:
        size = min(size, height, width)
        stride = max(1, round(size * stride_fraction))
        xs = list(range(0, width - size + 1, stride))
        ys = list(range(0, height - size + 1, stride))
        if xs[-1] != width - size:
            xs.append(width - size)
        if ys[-1] != height - size:
            ys.append(height - size)
        grid_y, grid_x = torch.meshgrid(
            torch.tensor(ys, dtype=torch.float32), torch.tensor(xs, dtype=torch.float32), indexing="ij"
        )
        x0, y0 = grid_x.reshape(-1), grid_y.reshape(-1)
        out.append(torch.stack([x0, y0, x0 + size, y0 + size], dim=1))
    return torch.cat(out)


def label_windows(
    windows: Tensor, boxes: Tensor, labels: Tensor, *, positive_iou: float = 0.5, negative_iou: float = 0.3
) -> Tensor:
    """Class of each window: the best-overlapping object's label when IoU >= ``positive_iou``,
    0 (background) when the best IoU < ``negative_iou``, -1 (ignored) in between.

    Args:
        windows: Tensor[W, 4] xyxy; boxes: Tensor[n, 4] xyxy; labels: Tensor[n] in 1..K.

    Returns:
        Tensor[W] int64.
    """
    if boxes.numel() == 0:
        return torch.zeros(len(windows), dtype=torch.long, device=windows.device)
    iou, idx = box_iou(windows, boxes).max(dim=1)
    out = torch.full((len(windows),), -1, dtype=torch.long, device=windows.device)
    out[iou < negative_iou] = 0
    pos = iou >= positive_iou
    out[pos] = labels[idx[pos]].long()
    return out


def greedy_merge(
    boxes: Tensor, scores: Tensor, labels: Tensor, *, iou_threshold: float
) -> tuple[Tensor, Tensor, Tensor]:
    """OverFeat's ad-hoc greedy merge of the boxes predicted for one image.

    Per class, repeatedly take the pair of boxes that match best (highest IoU); if their IoU is
    at least ``iou_threshold``, replace the two by their merge, else stop. The merged box is the
    mean of the merged windows' boxes weighted by their scores (OverFeat averages the pair's
    coordinates; weighting keeps a box merged from many windows from being pulled by one). The
    merged confidence is the best of the merged windows' confidences: OverFeat sums the class
    outputs instead, which saturates (a noisy-or reaches 1.0 in float32 after a few confident
    windows) and loses the ranking that average precision is computed from.

    Args:
        boxes: Tensor[n, 4] xyxy; scores: Tensor[n] in [0, 1]; labels: Tensor[n].
        iou_threshold: the match threshold.

    Returns:
        (boxes Tensor[m, 4], scores Tensor[m], labels Tensor[m]), m <= n, sorted by decreasing score.
    """
    out_boxes, out_scores, out_labels = [], [], []
    for cls in labels.unique():
        keep = labels == cls
        b, s = boxes[keep].clone(), scores[keep].clone()
        weight = s.clone()
        while len(b) > 1:
            iou = box_iou(b, b)
            iou.fill_diagonal_(-1.0)
            best = int(iou.argmax())
            i, j = divmod(best, len(b))
            if iou[i, j] < iou_threshold:
                break
            w = weight[i] + weight[j]
            merged = (weight[i] * b[i] + weight[j] * b[j]) / w.clamp(min=1e-12)
            merged_score = torch.maximum(s[i], s[j])
            rest = torch.ones(len(b), dtype=torch.bool, device=b.device)
            rest[[i, j]] = False
            b = torch.cat([b[rest], merged[None]])
            s = torch.cat([s[rest], merged_score[None]])
            weight = torch.cat([weight[rest], w[None]])
        out_boxes.append(b)
        out_scores.append(s)
        out_labels.append(torch.full((len(b),), int(cls), dtype=labels.dtype, device=labels.device))
    if not out_boxes:
        return boxes.new_zeros(0, 4), scores.new_zeros(0), labels.new_zeros(0)
    b, s, lab = torch.cat(out_boxes), torch.cat(out_scores), torch.cat(out_labels)
    order = s.argsort(descending=True)
    return b[order], s[order], lab[order]


def _select_detections(
    boxes: Tensor, probs: Tensor, *, score_threshold: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class candidates from window boxes and (K+1)-way probabilities (column 0 = background).

    Args:
        boxes: Tensor[W, 4]; probs: Tensor[W, K+1].

    Returns:
        (boxes Tensor[m, 4], scores Tensor[m], labels Tensor[m] in 1..K).
    """
    scores = probs[:, 1:]
    idx = torch.nonzero(scores > score_threshold)
    return boxes[idx[:, 0]], scores[idx[:, 0], idx[:, 1]], idx[:, 1] + 1


# --------------------------------------------------------------------------- sliding window


class SlidingWindowDetector(nn.Module):
    """A window classifier (backbone + linear layer over K objects and background) applied to every window.

    Args:
        backbone: the pretrained backbone of the classifier.
        num_classes: K object classes; the classifier has K + 1 outputs, 0 = background.
        image_size: images are resized to ``image_size x image_size``.
        window_sizes, stride_fraction: the window grid (:func:`sliding_windows`).
        crop_size: each window is resized (RoIAlign) to ``crop_size x crop_size``, the classifier's input.
        negatives_per_image: background windows drawn at random per image in training.
        positives_per_image: object windows per image in training (the ground-truth boxes
            themselves plus grid windows with IoU >= 0.5).
        score_threshold, nms_iou, max_detections: post-processing.
        window_batch: windows classified per forward pass at inference (memory bound).
        image_mean, image_std: input normalisation.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        image_size: int = 128,
        window_sizes: Sequence[int] = (24, 40, 64),
        stride_fraction: float = 0.5,
        crop_size: int = 32,
        negatives_per_image: int = 8,
        positives_per_image: int = 16,
        score_threshold: float = 0.05,
        nms_iou: float = 0.5,
        max_detections: int = 100,
        window_batch: int = 1024,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(backbone.out_channels, num_classes + 1)
        )
        self.transform = fixed_size_transform(image_size, image_mean, image_std)
        self.num_classes, self.image_size, self.crop_size = num_classes, image_size, crop_size
        self.negatives_per_image, self.positives_per_image = negatives_per_image, positives_per_image
        self.score_threshold, self.nms_iou, self.max_detections, self.window_batch = (
            score_threshold,
            nms_iou,
            max_detections,
            window_batch,
        )
        self.register_buffer(
            "windows",
            sliding_windows((image_size, image_size), window_sizes, stride_fraction),
            persistent=False,
        )

    @property
    def windows_per_image(self) -> int:
        """How many windows the classifier evaluates per image: the method's cost."""
        return len(self.windows)

    def classify_windows(self, batch: Tensor, windows: list[Tensor]) -> Tensor:
        """Crop each image's windows, resize them to ``crop_size`` and classify them.

        Args:
            batch: normalised Tensor[N, 3, H, W]; windows: per image Tensor[W_n, 4] xyxy pixels.

        Returns:
            logits Tensor[sum W_n, K + 1].
        """
        crops = roi_align(
            batch, windows, output_size=self.crop_size, spatial_scale=1.0, sampling_ratio=2, aligned=True
        )
        return self.classifier(self.backbone.forward_features(crops))

    def _training_windows(self, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Positives (the objects and grid windows overlapping them) and random background windows."""
        window_labels = label_windows(self.windows, boxes, labels)
        pos = torch.nonzero(window_labels > 0).squeeze(1)
        neg = torch.nonzero(window_labels == 0).squeeze(1)
        n_grid_pos = max(0, self.positives_per_image - len(boxes))
        pos = pos[torch.randperm(len(pos), device=pos.device)[:n_grid_pos]]
        neg = neg[torch.randperm(len(neg), device=neg.device)[: self.negatives_per_image]]
        win = torch.cat([boxes.to(self.windows.dtype), self.windows[pos], self.windows[neg]])
        lab = torch.cat([labels.long(), window_labels[pos], window_labels[neg]])
        return win, lab

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: ``{"loss_classifier"}`` (cross-entropy over sampled windows); eval: detections."""
        if self.training and targets is None:
            raise ValueError("SlidingWindowDetector in training mode needs targets")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        batch = image_list.tensors
        if self.training:
            assert targets is not None
            sampled = [self._training_windows(t["boxes"], t["labels"]) for t in targets]
            logits = self.classify_windows(batch, [w for w, _ in sampled])
            return {"loss_classifier": F.cross_entropy(logits, torch.cat([lab for _, lab in sampled]))}
        detections = []
        for k in range(len(batch)):
            probs = torch.cat(
                [
                    torch.softmax(self.classify_windows(batch[k : k + 1], [chunk]), dim=1)
                    for chunk in self.windows.split(self.window_batch)
                ]
            )
            boxes, scores, labels = _select_detections(
                self.windows, probs, score_threshold=self.score_threshold
            )
            keep = batched_nms(boxes, scores, labels, self.nms_iou)[: self.max_detections]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)


# --------------------------------------------------------------------------- OverFeat


class OverFeat(nn.Module):
    """OverFeat: dense multi-scale classification + box regression on a fully convolutional backbone.

    The backbone's last feature map (stride ``r``) is a grid of windows: location ``(u, v)`` of
    the map computed on the image scaled by ``s`` is the square window of side ``window_size / s``
    centred at ``((v + 0.5) r / s, (u + 0.5) r / s)`` in the input image. The classification
    head (the classifier's fully connected layers as 1x1 convolutions, K + 1 outputs) scores
    each window; the regression head predicts the object's box relative to the window:
    ``x = (cx - cx_w) / s_w``, ``y = (cy - cy_w) / s_w``, ``w = w_box / s_w``, ``h = h_box / s_w``.

    Training labels: a location is positive for an object when its window centre lies in the
    central part of the object's box (``center_fraction`` of its width and height; the smallest
    such object wins), ignored when it lies elsewhere in a box, background otherwise. The
    classification loss uses every positive, ``negatives_per_image`` random background windows
    and the ``hard_negative_ratio x positives`` background windows with the worst
    misclassification (hard-negative mining); the regression loss is the l2 loss on positives,
    computed on detached features so the convolutional layers stay fixed for it.

    Args:
        backbone: the pretrained backbone; its last level is evaluated densely.
        num_classes: K object classes (+1 background output).
        image_size: images are resized to ``image_size x image_size`` (scale 1).
        scales: the image scales of the dense evaluation.
        window_size: window side in pixels at scale 1.
        merge_iou: the greedy merge's match threshold; nms_iou: a final per-class NMS.
        hard_negative_ratio, negatives_per_image, center_fraction: training samples (above).
        head_channels: width of the two heads' hidden 3x3 convolution.
        score_threshold, max_detections, pre_merge_top_n: post-processing.
        image_mean, image_std: input normalisation.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        image_size: int = 128,
        scales: Sequence[float] = (1.0, 1.5),
        window_size: int = 48,
        merge_iou: float = 0.3,
        hard_negative_ratio: float = 3.0,
        negatives_per_image: int = 8,
        center_fraction: float = 0.5,
        head_channels: int = 128,
        score_threshold: float = 0.05,
        nms_iou: float = 0.5,
        max_detections: int = 100,
        pre_merge_top_n: int = 200,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.backbone = backbone
        c = backbone.out_channels
        self.cls_head = nn.Sequential(
            nn.Conv2d(c, head_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(head_channels, num_classes + 1, 1),
        )
        self.reg_head = nn.Sequential(
            nn.Conv2d(c, head_channels, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(head_channels, 4, 1)
        )
        self.transform = fixed_size_transform(image_size, image_mean, image_std)
        self.stride = backbone.strides[-1]
        self.num_classes, self.image_size, self.scales, self.window_size = (
            num_classes,
            image_size,
            list(scales),
            window_size,
        )
        self.merge_iou, self.hard_negative_ratio, self.negatives_per_image = (
            merge_iou,
            hard_negative_ratio,
            negatives_per_image,
        )
        self.center_fraction = center_fraction
        self.score_threshold, self.nms_iou, self.max_detections, self.pre_merge_top_n = (
            score_threshold,
            nms_iou,
            max_detections,
            pre_merge_top_n,
        )

    def windows_at(self, height: int, width: int, scale: float, device: torch.device) -> Tensor:
        """Windows of a ``height x width`` feature map at ``scale`` as Tensor[h * w, 4] (cx, cy, side, side) in input pixels."""
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * self.stride / scale
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * self.stride / scale
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        side = torch.full_like(cx, self.window_size / scale)
        return torch.stack([cx, cy, side, side], dim=-1).reshape(-1, 4)

    def dense_outputs(self, batch: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per scale: (class logits Tensor[N, h*w, K+1], regression Tensor[N, h*w, 4], windows Tensor[h*w, 4] cxcywh)."""
        out = []
        for scale in self.scales:
            x = (
                batch
                if scale == 1.0
                else F.interpolate(batch, scale_factor=scale, mode="bilinear", align_corners=False)
            )
            feats = self.backbone.forward_features(x)
            logits = self.cls_head(feats)
            reg = self.reg_head(feats.detach())  # the conv layers stay fixed for the regression loss
            n, _, h, w = logits.shape
            out.append(
                (
                    logits.permute(0, 2, 3, 1).reshape(n, h * w, -1),
                    reg.permute(0, 2, 3, 1).reshape(n, h * w, 4),
                    self.windows_at(h, w, scale, batch.device),
                )
            )
        return out

    def assign(self, windows: Tensor, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Label of each window (K class, 0 background, -1 ignored) and the index of its object.

        Args:
            windows: Tensor[W, 4] cxcywh; boxes: Tensor[n, 4] xyxy; labels: Tensor[n].
        """
        n_win = len(windows)
        if boxes.numel() == 0:
            return torch.zeros(n_win, dtype=torch.long, device=windows.device), torch.zeros(
                n_win, dtype=torch.long, device=windows.device
            )
        cx, cy = windows[:, 0:1], windows[:, 1:2]
        inside = (
            (cx >= boxes[:, 0]) & (cx <= boxes[:, 2]) & (cy >= boxes[:, 1]) & (cy <= boxes[:, 3])
        )  # [W, n]
        bcx, bcy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        # the central region never shrinks below one feature cell, so every object has a positive window
        half_w = torch.maximum(
            (boxes[:, 2] - boxes[:, 0]) * self.center_fraction / 2,
            windows[:, 2:3] / self.window_size * self.stride / 2,
        )
        half_h = torch.maximum(
            (boxes[:, 3] - boxes[:, 1]) * self.center_fraction / 2,
            windows[:, 3:4] / self.window_size * self.stride / 2,
        )
        central = ((cx - bcx).abs() <= half_w) & ((cy - bcy).abs() <= half_h)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        cost = torch.where(
            central, area.expand_as(central), torch.full_like(central, float("inf"), dtype=area.dtype)
        )
        best_cost, best = cost.min(dim=1)
        out = torch.zeros(n_win, dtype=torch.long, device=windows.device)
        out[inside.any(dim=1)] = -1
        positive = torch.isfinite(best_cost)
        out[positive] = labels[best[positive]].long()
        return out, best

    @staticmethod
    def encode(boxes: Tensor, windows: Tensor) -> Tensor:
        """xyxy boxes -> ``(x, y, w, h)`` relative to cxcywh windows (both Tensor[W, 4])."""
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        return torch.stack(
            [
                (cx - windows[:, 0]) / windows[:, 2],
                (cy - windows[:, 1]) / windows[:, 3],
                w / windows[:, 2],
                h / windows[:, 3],
            ],
            1,
        )

    @staticmethod
    def decode(reg: Tensor, windows: Tensor) -> Tensor:
        """Inverse of :meth:`encode`: Tensor[W, 4] relative ``(x, y, w, h)`` -> xyxy pixels."""
        cx = windows[:, 0] + reg[:, 0] * windows[:, 2]
        cy = windows[:, 1] + reg[:, 1] * windows[:, 3]
        w, h = reg[:, 2].clamp(min=0) * windows[:, 2], reg[:, 3].clamp(min=0) * windows[:, 3]
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)

    def losses(
        self, dense: list[tuple[Tensor, Tensor, Tensor]], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """``loss_classifier`` (cross-entropy with random and hard negatives) and ``loss_box_reg`` (l2)."""
        logits = torch.cat([d[0] for d in dense], dim=1)  # [N, W, K+1]
        reg = torch.cat([d[1] for d in dense], dim=1)
        windows = torch.cat([d[2] for d in dense])
        cls_losses, reg_losses = [], []
        for k, t in enumerate(targets):
            labels, obj = self.assign(windows, t["boxes"], t["labels"])
            ce = F.cross_entropy(logits[k], labels.clamp(min=0), reduction="none")
            pos = torch.nonzero(labels > 0).squeeze(1)
            background = torch.nonzero(labels == 0).squeeze(1)
            shuffled = background[torch.randperm(len(background), device=background.device)]
            random_neg, rest = shuffled[: self.negatives_per_image], shuffled[self.negatives_per_image :]
            n_hard = int(round(self.hard_negative_ratio * len(pos)))
            hard_neg = rest[ce[rest].detach().argsort(descending=True)[:n_hard]]
            chosen = torch.cat([pos, random_neg, hard_neg])
            cls_losses.append(ce[chosen])
            if len(pos):
                target_reg = self.encode(t["boxes"][obj[pos]].to(reg.dtype), windows[pos])
                reg_losses.append(((reg[k, pos] - target_reg) ** 2).sum(dim=1))
        chosen_ce = torch.cat(cls_losses)
        loss_cls = (
            chosen_ce.mean() if len(chosen_ce) else logits.sum() * 0.0
        )  # no object and no random negative drawn
        loss_reg = torch.cat(reg_losses).mean() if reg_losses else reg.sum() * 0.0
        return {"loss_classifier": loss_cls, "loss_box_reg": loss_reg}

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: ``{loss_classifier, loss_box_reg}``; eval: merged detections per image."""
        if self.training and targets is None:
            raise ValueError("OverFeat in training mode needs targets")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        dense = self.dense_outputs(image_list.tensors)
        if self.training:
            assert targets is not None
            return self.losses(dense, targets)
        size = image_list.tensors.shape[-2:]
        windows = torch.cat([d[2] for d in dense])
        detections = []
        for k in range(len(image_list.tensors)):
            probs = torch.cat([torch.softmax(d[0][k], dim=1) for d in dense])
            boxes = self.decode(torch.cat([d[1][k] for d in dense]), windows)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
            b, s, lab = _select_detections(boxes, probs, score_threshold=self.score_threshold)
            valid = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            b, s, lab = b[valid], s[valid], lab[valid]
            top = s.argsort(descending=True)[: self.pre_merge_top_n]
            b, s, lab = greedy_merge(b[top], s[top], lab[top], iou_threshold=self.merge_iou)
            keep = batched_nms(b, s, lab, self.nms_iou)[: self.max_detections]
            detections.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)


# --------------------------------------------------------------------------- builders


@register_model("detection", "sliding_window")
@passes_kwargs_to(SlidingWindowDetector)
def sliding_window(
    *,
    num_classes: int,
    backbone: str = "convnet_small",
    weights_backbone: str | None = None,
    trainable_backbone_layers: int | None = None,
    **kwargs: Any,
) -> SlidingWindowDetector:
    """The sliding-window baseline: the pretrained classifier + a background class over a window grid.

    Detection contract: ``list[Tensor[3,H,W]]`` in [0, 1]; training -> ``{loss_classifier}``;
    eval -> ``[{boxes xyxy pixels, labels 1..K, scores}]``. ``**kwargs`` go to :class:`SlidingWindowDetector`.
    """
    body = build_backbone(backbone, weights=weights_backbone, trainable_layers=trainable_backbone_layers)
    return SlidingWindowDetector(body, num_classes=num_classes, **kwargs)


@register_model("detection", "overfeat")
@passes_kwargs_to(OverFeat)
def overfeat(
    *,
    num_classes: int,
    backbone: str = "convnet_small",
    weights_backbone: str | None = None,
    trainable_backbone_layers: int | None = None,
    **kwargs: Any,
) -> OverFeat:
    """OverFeat: dense multi-scale classification and box regression, greedy merge.

    Detection contract: ``list[Tensor[3,H,W]]`` in [0, 1]; training -> ``{loss_classifier,
    loss_box_reg}``; eval -> ``[{boxes xyxy pixels, labels 1..K, scores}]``. ``**kwargs`` go to :class:`OverFeat`.
    """
    body = build_backbone(backbone, weights=weights_backbone, trainable_layers=trainable_backbone_layers)
    return OverFeat(body, num_classes=num_classes, **kwargs)
