"""The R-CNN lineage before Faster R-CNN: R-CNN (Girshick et al., 2014) and Fast R-CNN (Girshick, 2015).

Both take their region proposals from selective search (:mod:`components.ops.selective_search`)
and differ where the lecture says the bottleneck is:

* **R-CNN**, written as the lecture's four parts (:class:`RCNN`):

  1. selective search proposes regions (:meth:`RCNN.propose_regions`);
  2. every proposal is warped to the CNN's input size (``torchvision.ops.roi_align`` with aligned
     crops on the image itself) and the pre-trained CNN, put before its output layer, turns each
     crop into a feature vector (:meth:`RCNN.extract_features`): one CNN forward pass *per region*;
  3. a linear SVM per class plus background scores the features (:meth:`RCNN.classify`), trained
     one-vs-rest with the hinge loss (or the logistic loss);
  4. a class-specific linear regression model predicts the box correction (:meth:`RCNN.regress_boxes`),
     trained with the squared loss on proposals overlapping a ground-truth box by IoU >= 0.6,

  then per-class NMS. As in the paper, the CNN is fine-tuned on the warped regions with a softmax
  log loss (``loss_finetune``), while the SVMs and the regressors are trained on the *fixed*
  (detached) features; here the three are trained in the same steps instead of one after another.

* **Fast R-CNN** (:class:`FastRCNN`): the whole image goes through the backbone *once*;
  ``torchvision.ops.roi_pool`` (RoI pooling) turns each proposal's window of the feature map into a
  fixed-size map, and two fully connected layers feed a softmax classifier (K + 1 classes) and a
  class-specific box regressor trained *jointly* with the multi-task loss ``L_cls + [u >= 1] L_loc``
  (smooth L1). Sampling (25 % foreground at IoU >= 0.5), the loss and the decoding with per-class
  NMS are torchvision's ``RoIHeads``; only the pooling differs from Faster R-CNN's RoIAlign.

Both honour the project's detection contract (torchvision's ``GeneralizedRCNN``): input
``list[Tensor[3, H, W]]`` in [0, 1]; training ``model(images, targets)`` returns a dict of losses;
eval ``model(images)`` returns ``[{boxes (xyxy pixels), labels (1..K), scores}]``. Images are
resized (aspect kept, longer side ``image_size``) and normalised by torchvision's
``GeneralizedRCNNTransform``; proposals are searched on the input image (and cached on disk by
content), then scaled with it. After every forward, ``model.last_timings`` holds the seconds spent
in proposals, features and heads, which the lineage stage reports per image.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import box_iou, roi_align, roi_pool

from components.errors import DataError
from components.models.backbones import Backbone, build_backbone
from components.models.registry import passes_kwargs_to, register_model
from components.models.yolo_v1 import IMAGENET_MEAN, IMAGENET_STD
from components.ops.boxes import postprocess_detections
from components.ops.selective_search import ProposalCache, SelectiveSearchParams

# torchvision's Fast R-CNN weights: R-CNN's regression targets (t_x, t_y, t_w, t_h) scaled by (10, 10, 5, 5)
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


# --------------------------------------------------------------------------- shared parts


class SelectiveSearchProposer:
    """Part 1 of both detectors: selective-search proposals per image, cached by image content.

    Args:
        params: selective-search settings (``max_proposals`` is the number of proposals per image).
        cache_dir: folder of the on-disk cache (``None``: in memory for this process only).
    """

    def __init__(self, params: SelectiveSearchParams, cache_dir: str | None):
        self.params = params
        self.cache = ProposalCache(cache_dir, params)

    def __call__(self, images: Sequence[Tensor]) -> list[Tensor]:
        """``images`` (each ``Tensor[3, H, W]`` in [0, 1]) -> per image ``Tensor[N_i, 4]`` xyxy proposals in its pixels."""
        out = []
        for image in images:
            boxes = self.cache.get(image)
            if boxes.numel() == 0:  # a flat image: the whole image is the only region
                h, w = image.shape[-2:]
                boxes = torch.tensor([[0.0, 0.0, float(w), float(h)]])
            out.append(boxes.to(image.device))
        return out


def _check_inputs(
    images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None, training: bool
) -> None:
    """Refuse malformed batches with a :class:`DataError` rather than a deep torchvision traceback."""
    if training and targets is None:
        raise DataError(
            "the model is in training mode but no targets were given",
            fix="call model(images, targets) or model.eval()",
        )
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise DataError(
                f"image {i} must be a Tensor[3, H, W] in [0, 1], got {shape}",
                record=f"image {i}",
                fix="convert images with torchvision.transforms.v2",
            )
    if targets is None:
        return
    if len(targets) != len(images):
        raise DataError(
            f"{len(images)} images but {len(targets)} targets", fix="pass one target dict per image"
        )
    for i, t in enumerate(targets):
        boxes = t.get("boxes")
        if boxes is None or "labels" not in t or boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise DataError(
                f"target {i} needs boxes Tensor[N, 4] (xyxy pixels) and labels Tensor[N]",
                record=f"target {i}",
                fix="use DetectionDataset targets",
            )
        if len(boxes) and bool(((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any()):
            raise DataError(
                f"target {i} has a box of zero or negative width/height",
                record=f"target {i}",
                fix="drop degenerate boxes (augment.min_box_size)",
            )


def _scale_proposals(
    proposals: list[Tensor], original_sizes: list[tuple[int, int]], new_sizes: list[tuple[int, int]]
) -> list[Tensor]:
    """Proposals searched on the input images, mapped to the resized network input (as the transform maps targets)."""
    return [
        resize_boxes(p, old, new) for p, old, new in zip(proposals, original_sizes, new_sizes, strict=True)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _detection_transform(
    image_size: int, image_mean: Sequence[float], image_std: Sequence[float]
) -> GeneralizedRCNNTransform:
    """Resize (longer side ``image_size``, aspect kept), normalise, pad into a batch; ``postprocess`` maps boxes back."""
    return GeneralizedRCNNTransform(
        min_size=image_size,
        max_size=image_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
        size_divisible=16,
    )


# --------------------------------------------------------------------------- R-CNN


class RCNN(nn.Module):
    """R-CNN on a project backbone, in the lecture's four parts (see the module docstring).

    Args:
        backbone: the pre-trained CNN (its last stage, global-average pooled, gives the features).
        num_classes: K object classes (labels 1..K; column 0 of the classifiers is background).
        proposer: selective search (part 1).
        image_size: longer side of the network input.
        crop_size: side of the warped region fed to the CNN (part 2).
        rois_per_image: regions sampled per image for a training step, ``positive_fraction`` of them foreground.
        classifier_loss: ``"hinge"`` (linear SVMs, one-vs-rest) or ``"logistic"`` (one-vs-rest logistic regression).
        fg_iou, bg_iou: a proposal is foreground at IoU >= ``fg_iou`` with a ground-truth box, background
            below ``bg_iou`` (R-CNN's SVMs: 0.3), ignored in between.
        regression_iou: proposals that train the box regressor overlap their box by at least this (R-CNN: 0.6).
        score_threshold, nms_iou, max_detections: decoding.
        feature_chunk: regions per CNN forward pass at inference (bounds memory).
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        proposer: SelectiveSearchProposer,
        image_size: int = 128,
        crop_size: int = 32,
        rois_per_image: int = 32,
        positive_fraction: float = 0.25,
        classifier_loss: Literal["hinge", "logistic"] = "hinge",
        fg_iou: float = 0.5,
        bg_iou: float = 0.3,
        regression_iou: float = 0.6,
        score_threshold: float = 0.05,
        nms_iou: float = 0.5,
        max_detections: int = 100,
        feature_chunk: int = 256,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        if classifier_loss not in ("hinge", "logistic"):
            raise ValueError(f"classifier_loss must be 'hinge' or 'logistic', got {classifier_loss!r}")
        self.transform = _detection_transform(image_size, image_mean, image_std)
        self.proposer = proposer
        self.backbone = backbone
        dim = backbone.out_channels
        self.finetune_classifier = nn.Linear(dim, num_classes + 1)  # the CNN's softmax layer for fine-tuning
        self.svm = nn.Linear(dim, num_classes + 1)  # part 3: one linear SVM per class plus background
        self.box_regressor = nn.Linear(dim, 4 * num_classes)  # part 4: class-specific linear regression
        # an untrained regressor keeps the proposal (torchvision initialises Fast R-CNN's bbox_pred alike)
        nn.init.normal_(self.box_regressor.weight, std=0.001)
        nn.init.zeros_(self.box_regressor.bias)
        self.num_classes = num_classes
        self.crop_size = crop_size
        self.classifier_loss = classifier_loss
        self.regression_iou = regression_iou
        self.matcher = det_utils.Matcher(fg_iou, bg_iou, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(rois_per_image, positive_fraction)
        self.box_coder = det_utils.BoxCoder(BOX_CODER_WEIGHTS)
        self.score_threshold, self.nms_iou, self.max_detections = score_threshold, nms_iou, max_detections
        self.feature_chunk = feature_chunk
        self.last_timings: dict[str, float] = {}

    # ------------------------------------------------------------------ the four parts

    def propose_regions(self, images: Sequence[Tensor]) -> list[Tensor]:
        """Part 1: selective-search proposals per image (``Tensor[N_i, 4]`` in the input image's pixels)."""
        return self.proposer(images)

    def warp_regions(self, batch: Tensor, rois: list[Tensor] | Tensor) -> Tensor:
        """Part 2a: crop every region out of the normalised image and resize it to ``crop_size`` (RoIAlign, aligned).

        Args:
            batch: Tensor[N, 3, H, W] normalised images.
            rois: per image, Tensor[R_i, 4] xyxy boxes in ``batch`` pixels, or Tensor[R, 5] rows
                ``(image index, x1, y1, x2, y2)``.

        Returns:
            Tensor[sum R_i, 3, crop_size, crop_size].
        """
        return roi_align(
            batch, rois, output_size=self.crop_size, spatial_scale=1.0, sampling_ratio=2, aligned=True
        )

    def extract_features(self, crops: Tensor) -> Tensor:
        """Part 2b: the CNN before its output layer, one forward pass per region: Tensor[R, 3, s, s] -> Tensor[R, C]."""
        return self.backbone.forward_features(crops).mean(dim=(2, 3))

    def classify(self, features: Tensor) -> Tensor:
        """Part 3: SVM margins per class plus background, Tensor[R, C] -> Tensor[R, K + 1]."""
        return self.svm(features)

    def regress_boxes(self, features: Tensor) -> Tensor:
        """Part 4: class-specific box corrections (t_x, t_y, t_w, t_h), Tensor[R, C] -> Tensor[R, K, 4]."""
        return self.box_regressor(features).reshape(-1, self.num_classes, 4)

    # ------------------------------------------------------------------ training

    def _sample(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """Balanced foreground/background regions per image (ground-truth boxes added to the proposals).

        Returns:
            rois (per image Tensor[R_i, 4]), labels Tensor[R] (0 background, 1..K), the matched
            ground-truth boxes Tensor[R, 4], and their IoU Tensor[R].
        """
        rois_out, labels_out, gt_out, iou_out = [], [], [], []
        for props, t in zip(proposals, targets, strict=True):
            gt_boxes, gt_labels = t["boxes"].to(props), t["labels"].to(props.device, torch.int64)
            props = torch.cat([props, gt_boxes])
            if len(gt_boxes) == 0:
                labels = torch.zeros(len(props), dtype=torch.int64, device=props.device)
                matched = torch.zeros_like(props)
                best = torch.zeros(len(props), device=props.device)
            else:
                iou = box_iou(gt_boxes, props)  # [G, P]
                idx = self.matcher(iou)
                best = iou.max(dim=0).values
                matched = gt_boxes[idx.clamp(min=0)]
                labels = gt_labels[idx.clamp(min=0)]
                labels[idx == self.matcher.BELOW_LOW_THRESHOLD] = 0
                labels[idx == self.matcher.BETWEEN_THRESHOLDS] = -1
            pos, neg = self.sampler([labels])
            keep = torch.where(pos[0] | neg[0])[0]
            rois_out.append(props[keep])
            labels_out.append(labels[keep])
            gt_out.append(matched[keep])
            iou_out.append(best[keep])
        return rois_out, torch.cat(labels_out), torch.cat(gt_out), torch.cat(iou_out)

    def _losses(
        self, features: Tensor, rois: Tensor, labels: Tensor, matched: Tensor, iou: Tensor
    ) -> dict[str, Tensor]:
        # fine-tuning the CNN on warped regions: softmax log loss over K + 1 classes (R-CNN's first training stage)
        loss_finetune = F.cross_entropy(self.finetune_classifier(features), labels)
        fixed = features.detach()  # the SVMs and the regressors learn on fixed features, as in the paper
        margins = self.classify(fixed)
        # one-vs-rest: y_ic = +1 for the region's class (background included), -1 for every other class
        sign = torch.full_like(margins, -1.0).scatter_(1, labels[:, None], 1.0)
        if self.classifier_loss == "hinge":
            loss_svm = F.relu(1.0 - sign * margins).sum(dim=1).mean()
        else:
            loss_svm = F.softplus(-sign * margins).sum(dim=1).mean()
        reg = (labels > 0) & (iou >= self.regression_iou)
        if reg.any():
            pred = self.regress_boxes(fixed[reg])[torch.arange(int(reg.sum())), labels[reg] - 1]
            target = self.box_coder.encode_single(matched[reg], rois[reg])
            loss_box = F.mse_loss(pred, target, reduction="sum") / labels.numel()  # linear (ridge) regression
        else:
            loss_box = fixed.sum() * 0.0 + self.box_regressor.weight.sum() * 0.0
        return {"loss_finetune": loss_finetune, "loss_svm": loss_svm, "loss_box_reg": loss_box}

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def _detect(
        self, features: Tensor, rois: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """SVM scores (sigmoid of the margins) and regressed boxes per class, then per-class NMS."""
        scores = torch.sigmoid(self.classify(features))[:, 1:]  # [R, K]
        deltas = self.regress_boxes(features)  # [R, K, 4]
        out = []
        for feats_scores, feats_deltas, props, size in zip(
            scores.split([len(r) for r in rois]),
            deltas.split([len(r) for r in rois]),
            rois,
            image_sizes,
            strict=True,
        ):
            boxes = self.box_coder.decode_single(
                feats_deltas.reshape(-1, 4), props.repeat_interleave(self.num_classes, dim=0)
            )
            labels = torch.arange(1, self.num_classes + 1, device=boxes.device).repeat(len(props))
            boxes, kept_scores, labels = postprocess_detections(
                boxes,
                feats_scores.reshape(-1),
                labels,
                score_threshold=self.score_threshold,
                nms_iou=self.nms_iou,
                max_detections=self.max_detections,
                image_size=size,
            )
            out.append({"boxes": boxes, "scores": kept_scores, "labels": labels})
        return out

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: ``{loss_finetune, loss_svm, loss_box_reg}``; eval: per image ``{boxes, labels, scores}``."""
        _check_inputs(images, targets, self.training)
        device = images[0].device
        start = time.perf_counter()
        proposals = self.propose_regions(images)
        t_proposals = time.perf_counter()
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        proposals = _scale_proposals(proposals, original_sizes, image_list.image_sizes)
        if self.training:
            assert targets is not None
            rois, labels, matched, iou = self._sample(proposals, targets)
            features = self.extract_features(self.warp_regions(image_list.tensors, rois))
            t_features = time.perf_counter()
            losses = self._losses(features, torch.cat(rois), labels, matched, iou)
            self.last_timings = {
                "proposals_s": t_proposals - start,
                "features_s": t_features - t_proposals,
                "head_s": time.perf_counter() - t_features,
            }
            return losses
        feats = []
        flat = torch.cat(
            [
                torch.cat([torch.full((len(p), 1), float(i), device=device), p], dim=1)
                for i, p in enumerate(proposals)
            ]
        )
        for chunk in flat.split(self.feature_chunk):  # one CNN pass per region, in chunks
            feats.append(self.extract_features(self.warp_regions(image_list.tensors, chunk)))
        features = torch.cat(feats) if feats else torch.zeros(0, self.backbone.out_channels, device=device)
        _sync(device)
        t_features = time.perf_counter()
        detections = self._detect(features, proposals, image_list.image_sizes)
        detections = self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        _sync(device)
        self.last_timings = {
            "proposals_s": t_proposals - start,
            "features_s": t_features - t_proposals,
            "head_s": time.perf_counter() - t_features,
        }
        return detections


# --------------------------------------------------------------------------- Fast R-CNN


class RoIPool(nn.Module):
    """RoI pooling (Fast R-CNN) over one feature map, with the ``box_roi_pool(features, proposals, image_shapes)``
    signature torchvision's ``RoIHeads`` expects.

    Each proposal's window on the feature map (``spatial_scale = 1 / stride``, corners rounded) is
    divided into an ``output_size x output_size`` grid and max-pooled per cell
    (:func:`torchvision.ops.roi_pool`).
    """

    def __init__(self, featmap_name: str, output_size: int, spatial_scale: float):
        super().__init__()
        self.featmap_name, self.output_size, self.spatial_scale = featmap_name, output_size, spatial_scale

    def forward(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """features[name] Tensor[N, C, h, w], proposals per image Tensor[R_i, 4] -> Tensor[sum R_i, C, s, s]."""
        return roi_pool(
            features[self.featmap_name],
            proposals,
            output_size=self.output_size,
            spatial_scale=self.spatial_scale,
        )


class FastRCNN(nn.Module):
    """Fast R-CNN: one backbone pass per image, RoI pooling over the selective-search proposals, joint heads.

    Args:
        backbone: the pre-trained CNN; the stage whose stride is closest to ``feature_stride`` is pooled.
        num_classes: K object classes (labels 1..K).
        proposer: selective search.
        image_size: longer side of the network input.
        roi_output_size: side of the pooled map (7 in the paper).
        feature_stride: stride of the pooled feature map (16 in the paper's VGG16; 8 suits 20-60 px objects).
        representation_size: width of the two fully connected layers.
        rois_per_image, positive_fraction: RoI sampling (the paper: 64 per image, 25 % foreground).
        fg_iou, bg_iou: foreground at IoU >= ``fg_iou``, background below ``bg_iou``.
        score_threshold, nms_iou, max_detections: decoding.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        proposer: SelectiveSearchProposer,
        image_size: int = 128,
        roi_output_size: int = 7,
        feature_stride: int = 8,
        representation_size: int = 256,
        rois_per_image: int = 64,
        positive_fraction: float = 0.25,
        fg_iou: float = 0.5,
        bg_iou: float = 0.5,
        score_threshold: float = 0.05,
        nms_iou: float = 0.5,
        max_detections: int = 100,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.transform = _detection_transform(image_size, image_mean, image_std)
        self.proposer = proposer
        self.backbone = backbone
        level = min(
            range(len(backbone.strides)), key=lambda i: (abs(backbone.strides[i] - feature_stride), -i)
        )
        self.featmap_name = str(level)
        self.feature_stride = backbone.strides[level]
        channels = backbone.channels[level]
        self.roi_heads = RoIHeads(
            box_roi_pool=RoIPool(self.featmap_name, roi_output_size, 1.0 / self.feature_stride),
            box_head=TwoMLPHead(channels * roi_output_size**2, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
            fg_iou_thresh=fg_iou,
            bg_iou_thresh=bg_iou,
            batch_size_per_image=rois_per_image,
            positive_fraction=positive_fraction,
            bbox_reg_weights=BOX_CODER_WEIGHTS,
            score_thresh=score_threshold,
            nms_thresh=nms_iou,
            detections_per_img=max_detections,
        )
        self.num_classes = num_classes
        self.last_timings: dict[str, float] = {}

    def extract_features(self, batch: Tensor) -> OrderedDict[str, Tensor]:
        """The whole image through the backbone once, up to the pooled stage: {name: Tensor[N, C, H/s, W/s]}."""
        feats: OrderedDict[str, Tensor] = OrderedDict()
        x = batch
        for i, stage in enumerate(self.backbone.stages[: int(self.featmap_name) + 1]):
            x = stage(x)
            feats[str(i)] = x
        return feats

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: ``{loss_classifier, loss_box_reg}`` (the joint multi-task loss); eval: per image ``{boxes, labels, scores}``."""
        _check_inputs(images, targets, self.training)
        device = images[0].device
        start = time.perf_counter()
        proposals = self.proposer(images)
        t_proposals = time.perf_counter()
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        if targets is not None:
            targets = [{"boxes": t["boxes"], "labels": t["labels"].to(torch.int64)} for t in targets]
        proposals = _scale_proposals(proposals, original_sizes, image_list.image_sizes)
        features = self.extract_features(image_list.tensors)
        _sync(device)
        t_features = time.perf_counter()
        detections, losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if not self.training:
            detections = self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        _sync(device)
        self.last_timings = {
            "proposals_s": t_proposals - start,
            "features_s": t_features - t_proposals,
            "head_s": time.perf_counter() - t_features,
        }
        return losses if self.training else detections


# --------------------------------------------------------------------------- builders


def _proposer(
    proposals_per_image: int,
    ss_scales: Sequence[float],
    ss_sigma: float,
    ss_min_size: int,
    ss_color_spaces: Sequence[str],
    ss_similarities: Sequence[str],
    proposal_cache: str | None,
) -> SelectiveSearchProposer:
    params = SelectiveSearchParams(
        scales=tuple(float(s) for s in ss_scales),
        sigma=ss_sigma,
        min_size=ss_min_size,
        color_spaces=tuple(ss_color_spaces),  # type: ignore[arg-type]
        similarities=tuple(ss_similarities),
        max_proposals=proposals_per_image,
    )
    return SelectiveSearchProposer(params, proposal_cache)


@register_model("detection", "rcnn")
@passes_kwargs_to(RCNN, exclude=("proposer",))
def rcnn(
    *,
    num_classes: int,
    backbone: str = "convnet_small",
    weights_backbone: str | None = None,
    trainable_backbone_layers: int | None = None,
    proposals_per_image: int = 100,
    ss_scales: Sequence[float] = (100.0,),
    ss_sigma: float = 0.8,
    ss_min_size: int = 20,
    ss_color_spaces: Sequence[str] = ("hsv",),
    ss_similarities: Sequence[str] = ("ctsf",),
    proposal_cache: str | None = None,
    **kwargs: Any,
) -> RCNN:
    """R-CNN: selective search, per-region CNN features, linear SVMs and class-specific box regressors, NMS.

    ``weights_backbone``: None, a torchvision enum name or a checkpoint path (the pretrain stage's
    ``outputs/pretrain/backbone.pt``). Proposals are cached under ``proposal_cache`` (None: in memory).
    The ``proposals_per_image`` and ``ss_*`` arguments configure selective search; ``**kwargs`` go to
    :class:`RCNN`.

    Detection contract: ``list[Tensor[3,H,W]]`` in [0, 1]; training ``model(images, targets)`` ->
    ``{loss_finetune, loss_svm, loss_box_reg}``; eval -> ``[{boxes xyxy pixels, labels 1..K, scores}]``.
    """
    body = build_backbone(backbone, weights=weights_backbone, trainable_layers=trainable_backbone_layers)
    proposer = _proposer(
        proposals_per_image,
        ss_scales,
        ss_sigma,
        ss_min_size,
        ss_color_spaces,
        ss_similarities,
        proposal_cache,
    )
    return RCNN(body, num_classes=num_classes, proposer=proposer, **kwargs)


@register_model("detection", "fast_rcnn")
@passes_kwargs_to(FastRCNN, exclude=("proposer",))
def fast_rcnn(
    *,
    num_classes: int,
    backbone: str = "convnet_small",
    weights_backbone: str | None = None,
    trainable_backbone_layers: int | None = None,
    proposals_per_image: int = 100,
    ss_scales: Sequence[float] = (100.0,),
    ss_sigma: float = 0.8,
    ss_min_size: int = 20,
    ss_color_spaces: Sequence[str] = ("hsv",),
    ss_similarities: Sequence[str] = ("ctsf",),
    proposal_cache: str | None = None,
    **kwargs: Any,
) -> FastRCNN:
    """Fast R-CNN: selective search, one backbone pass, RoI pooling, joint softmax + box-regression heads, NMS.

    Selective search and the backbone as in :func:`rcnn`; ``**kwargs`` go to :class:`FastRCNN`.

    Detection contract: ``list[Tensor[3,H,W]]`` in [0, 1]; training ``model(images, targets)`` ->
    ``{loss_classifier, loss_box_reg}``; eval -> ``[{boxes xyxy pixels, labels 1..K, scores}]``.
    """
    body = build_backbone(backbone, weights=weights_backbone, trainable_layers=trainable_backbone_layers)
    proposer = _proposer(
        proposals_per_image,
        ss_scales,
        ss_sigma,
        ss_min_size,
        ss_color_spaces,
        ss_similarities,
        proposal_cache,
    )
    return FastRCNN(body, num_classes=num_classes, proposer=proposer, **kwargs)
