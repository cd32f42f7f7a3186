"""ONNX export of every visionflow model, with its pre- and post-processing contract in the file.

``export_onnx(checkpoint, out_dir)`` rebuilds the model from its checkpoint alone
(``components.engine.load_model``), wraps it in a graph module for its family and writes
``<model_name>.onnx`` with TorchScript's exporter (``torch.onnx.export(..., dynamo=False)``,
opset 17: the one torchvision's own ONNX tests use for its detectors; the dynamo exporter
cannot export their data-dependent NMS and mask pasting). The graph's ``metadata_props`` hold a
``visionflow`` JSON record that :class:`components.export.onnx_runtime.OnnxPredictor` (torch-free)
reads: task, categories, the input resize, the post-processing and its thresholds.

Every graph takes ``images: float32[N, 3, S, S]`` in [0, 1], RGB, already resized to the
checkpoint's ``image_size`` S (antialiased bilinear, what ``ImagePredictor`` does; a classifier
with ``eval_crop``: shorter side then the centre square, recorded in the metadata); the
normalisation (the checkpoint's mean/std and the detector's own ``image_mean``/``image_std``) is
inside the graph. Per family (:data:`POSTPROCESS` is the table the README shows):

======================  ===========  ==========================================================
family                  batch        outputs / post-processing
======================  ===========  ==========================================================
classifier              dynamic N    ``probabilities [N, K]`` (softmax in the graph)
backbone                dynamic N    ``embedding [N, C]`` (global average pool in the graph)
fcn, unet               dynamic N    ``logits [N, K+1, S, S]``; resize to the input + argmax in numpy
yolo, sliding_window,   dynamic N    ``boxes [N, M, 4]`` decoded candidates (network pixels) and
overfeat                             ``scores [N, M, K]``; threshold (+ OverFeat's greedy merge) and
                                     per-class NMS in numpy (``onnx_runtime.select_detections``)
ssd, retinanet          dynamic N    ``boxes [N, A, 4]`` decoded against the anchors (constants of
                                     the S x S graph), ``scores [N, A, K(+1)]``; torchvision's
                                     threshold / top-k / NMS in numpy (``select_topk_per_class``,
                                     ``select_topk_per_level``)
faster_rcnn, mask_rcnn  1 image      torchvision's whole post-processing in the graph: ``boxes``,
                        per run      ``labels``, ``scores`` (+ ``masks [M, 1, S, S]``); the
                                     consumer runs the graph once per image (GeneralizedRCNN loops
                                     over the images in Python: tracing fixes that loop's length)
rcnn, fast_rcnn         1 image      a second input ``proposals [R, 4]``: selective search
                        per run      (``components/ops/selective_search.py``: scikit-image + numpy
                                     region grouping, not a graph) runs beside the graph
                                     (:func:`selective_search_proposals`); warping / RoI pooling,
                                     heads, decoding and NMS are in the graph
======================  ===========  ==========================================================
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from components.errors import CheckpointError, ConfigError
from components.io import atomic_write_bytes

OPSET = 17
METADATA_KEY = "visionflow"
FORMAT_VERSION = 1

#: per model name: where its post-processing runs (the README's table is this dict).
POSTPROCESS: dict[str, str] = {
    "classifier": "softmax in the graph",
    "convnet": "softmax in the graph",
    "backbone": "global average pool in the graph",
    "fcn": "logits in the graph; resize + argmax in numpy",
    "unet": "logits in the graph; resize + argmax in numpy",
    "yolo": "box decoding in the graph; threshold + per-class NMS in numpy",
    "sliding_window": "window classification in the graph; threshold + per-class NMS in numpy",
    "overfeat": "box regression decoding in the graph; threshold + greedy merge + per-class NMS in numpy",
    "faster_rcnn": "everything in the graph (torchvision: RPN, RoIAlign, decoding, NMS)",
    "retinanet": "decoding against the anchors in the graph; per-level threshold + top-k + per-class NMS in numpy",
    "ssd": "decoding against the default boxes in the graph; per-class threshold + top-k + NMS in numpy",
    "mask_rcnn": "everything in the graph (torchvision: decoding, NMS, mask pasting); mask threshold + RLE in numpy",
}
#: detectors whose region proposals are a second graph input: selective search (scikit-image's
#: Felzenszwalb segmentation + hierarchical grouping in numpy/scipy) is not a graph; the proposals
#: come from :func:`selective_search_proposals` (torch side) or any proposer of the consumer's
PROPOSAL_GRAPHS = {"rcnn", "fast_rcnn"}
POSTPROCESS.update({
    "rcnn": "proposals as a second input (selective search beside the graph); warping, SVM scores, box regression, NMS in the graph",
    "fast_rcnn": "proposals as a second input (selective search beside the graph); RoI pooling, heads, decoding, NMS in the graph",
})


class ExportError(CheckpointError):
    """A model that cannot be exported to ONNX (the message says why and what to do instead)."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ``.onnx`` file.
        metadata: the ``visionflow`` record stored in the graph (task, categories, pre/post-processing).
        seconds: export wall time (trace + write + check).
    """

    path: Path
    metadata: dict[str, Any]
    seconds: float


# --------------------------------------------------------------------------- graph modules


class _Normalize(nn.Module):
    """``(x - mean) / std`` per channel, or the identity when no statistics are given."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None):
        super().__init__()
        self.enabled = mean is not None and std is not None
        self.register_buffer("mean", torch.tensor(list(mean or [0.0, 0.0, 0.0]), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std or [1.0, 1.0, 1.0]), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return (x - self.mean) / self.std if self.enabled else x


def _transform_normalize(model: nn.Module) -> _Normalize:
    """The detector's own input normalisation (its ``GeneralizedRCNNTransform``'s ``image_mean/std``)."""
    transform = model.transform
    return _Normalize(transform.image_mean, transform.image_std)


class ClassifierGraph(nn.Module):
    """``images [N, 3, S, S]`` -> ``probabilities [N, K]`` (softmax of the logits)."""

    def __init__(self, model: nn.Module, normalize: _Normalize):
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, images: Tensor) -> Tensor:  # noqa: D102
        return torch.softmax(self.model(self.normalize(images)).float(), dim=1)


class BackboneGraph(ClassifierGraph):
    """``images [N, 3, S, S]`` -> ``embedding [N, C]`` (last feature map, global average pooled)."""

    def forward(self, images: Tensor) -> Tensor:  # noqa: D102
        return self.model.forward_features(self.normalize(images)).mean(dim=(-2, -1))


class SemanticGraph(ClassifierGraph):
    """``images [N, 3, S, S]`` -> ``logits [N, K + 1, S, S]``."""

    def forward(self, images: Tensor) -> Tensor:  # noqa: D102
        return self.model(self.normalize(images)).float()


def _clamp_xyxy(xyxy: Tensor, height: float, width: float) -> Tensor:
    """Clamp ``[..., 4]`` xyxy boxes to the image (as the detectors' in-place slice clamps)."""
    x1, y1, x2, y2 = xyxy.unbind(-1)
    return torch.stack([x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)], dim=-1)


class YoloGraph(nn.Module):
    """YOLO v1 up to the class-specific confidences: ``boxes [N, S*S*B, 4]``, ``scores [N, S*S*B, K]``.

    The same arithmetic as ``YOLOv1.decode`` before its threshold: cell-relative boxes to clamped
    xyxy pixels of the network input, confidence ``c_ij * p_ic`` per box and class.
    """

    def __init__(self, model: nn.Module, normalize: _Normalize):
        super().__init__()
        self.model, self.normalize, self.transform_normalize = model, normalize, _transform_normalize(model)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        from components.models.yolo_v1 import _cells_to_xyxy

        m = self.model
        x = self.transform_normalize(self.normalize(images))
        pred = m.predict_grid(x)
        n, B, C = pred.shape[0], m.B, m.num_classes
        boxes = pred[..., : 5 * B].reshape(n, m.S, m.S, B, 5)
        h, w = float(images.shape[-2]), float(images.shape[-1])
        scale = torch.tensor([w, h, w, h], dtype=pred.dtype)
        xyxy = _clamp_xyxy(_cells_to_xyxy(boxes[..., :4], grid_dims=(1, 2)) * scale, h, w)
        scores = boxes[..., 4:5] * pred[..., 5 * B :].unsqueeze(3)  # [N, S, S, B, C]
        return xyxy.reshape(n, -1, 4), scores.reshape(n, -1, C)


class SlidingWindowGraph(YoloGraph):
    """Every window of the grid classified: ``boxes [N, W, 4]`` (the windows), ``scores [N, W, K]`` (softmax, background dropped)."""

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        from torchvision.ops import roi_align

        m = self.model
        x = self.transform_normalize(self.normalize(images))
        n, windows = x.shape[0], m.windows
        count = windows.shape[0]
        index = torch.arange(n, dtype=x.dtype).view(-1, 1, 1).expand(n, count, 1)
        rois = torch.cat([index, windows.to(x.dtype).unsqueeze(0).expand(n, count, 4)], dim=2).reshape(-1, 5)
        crops = roi_align(x, rois, output_size=m.crop_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        probs = torch.softmax(m.classifier(m.backbone.forward_features(crops)), dim=1).reshape(n, count, -1)
        return windows.to(x.dtype).unsqueeze(0).expand(n, count, 4), probs[..., 1:]


class OverFeatGraph(YoloGraph):
    """Dense multi-scale windows: ``boxes [N, W, 4]`` (regressed, clamped), ``scores [N, W, K]`` (softmax, background dropped)."""

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        m = self.model
        x = self.transform_normalize(self.normalize(images))
        dense = m.dense_outputs(x)
        probs = torch.cat([torch.softmax(d[0], dim=2) for d in dense], dim=1)
        reg = torch.cat([d[1] for d in dense], dim=1)
        win = torch.cat([d[2] for d in dense]).unsqueeze(0)
        cx, cy = win[..., 0] + reg[..., 0] * win[..., 2], win[..., 1] + reg[..., 1] * win[..., 3]
        w, h = reg[..., 2].clamp(min=0) * win[..., 2], reg[..., 3].clamp(min=0) * win[..., 3]
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        return _clamp_xyxy(boxes, float(x.shape[-2]), float(x.shape[-1])), probs[..., 1:]


def _anchors(model: nn.Module, batch: Tensor, features: list[Tensor], side: int) -> Tensor:
    """The anchors of one ``S x S`` image in its (padded) batch, the same for every image: Tensor[A, 4] xyxy."""
    from torchvision.models.detection.image_list import ImageList

    with torch.no_grad():
        return model.anchor_generator(ImageList(batch, [(side, side)] * len(batch)), features)[0]


class SSDGraph(nn.Module):
    """SSD's dense part: ``boxes [N, A, 4]`` (decoded, clipped) and ``scores [N, A, K]`` (softmax, background dropped).

    The anchors of the ``S x S`` input are constants of the graph; the per-class threshold, top-k
    and NMS of ``SSD.postprocess_detections`` run in numpy (``onnx_runtime.select_topk_per_class``).
    """

    def __init__(self, model: nn.Module, normalize: _Normalize, side: int):
        super().__init__()
        self.model, self.normalize, self.transform_normalize = model, normalize, _transform_normalize(model)
        example = self._pad(self.transform_normalize(torch.zeros(1, 3, side, side)))
        self.register_buffer("anchors", _anchors(model, example, self._features(example), side))

    def _pad(self, x: Tensor) -> Tensor:
        return x  # SSD's transform resizes to S x S exactly (size_divisible 1)

    def _features(self, x: Tensor) -> list[Tensor]:
        feats = self.model.backbone(x)
        return list(feats.values()) if isinstance(feats, dict) else [feats]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        m = self.model
        x = self.transform_normalize(self.normalize(images))
        head = m.head(self._features(x))
        n, count = head["bbox_regression"].shape[0], self.anchors.shape[0]
        anchors = self.anchors.unsqueeze(0).expand(n, count, 4).reshape(-1, 4)
        boxes = m.box_coder.decode_single(head["bbox_regression"].reshape(-1, 4), anchors).reshape(n, count, 4)
        boxes = _clamp_xyxy(boxes, float(x.shape[-2]), float(x.shape[-1]))
        return boxes, self._scores(head["cls_logits"])

    def _scores(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=-1)[..., 1:]  # SSD: softmax over K + 1, background dropped


class RetinaNetGraph(SSDGraph):
    """RetinaNet's dense part: ``boxes [N, A, 4]`` (decoded, clipped) and ``scores [N, A, K + 1]`` (sigmoid).

    The input is padded to the transform's ``size_divisible`` as torchvision does; the per-level
    threshold and top-k, and the NMS of ``RetinaNet.postprocess_detections`` run in numpy
    (``onnx_runtime.select_topk_per_level``, the level sizes in the metadata).
    """

    def __init__(self, model: nn.Module, normalize: _Normalize, side: int):
        self.divisible = int(model.transform.size_divisible)
        super().__init__(model, normalize, side)
        feats = self._features(self._pad(torch.zeros(1, 3, side, side)))
        per_location = self.anchors.shape[0] // sum(f.shape[-2] * f.shape[-1] for f in feats)
        self.level_sizes = [int(f.shape[-2] * f.shape[-1] * per_location) for f in feats]

    def _pad(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-int(h)) % self.divisible, (-int(w)) % self.divisible
        return torch.nn.functional.pad(x, (0, pw, 0, ph)) if ph or pw else x

    def _features(self, x: Tensor) -> list[Tensor]:
        return list(self.model.backbone(self._pad(x)).values())  # padding twice is a no-op

    def _scores(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)  # RetinaNet: one sigmoid per class column, the column is the label


class TorchvisionGraph(nn.Module):
    """A torchvision-style detector with its post-processing: ``images [1, 3, S, S]`` -> ``boxes, labels, scores[, masks]``."""

    def __init__(self, model: nn.Module, normalize: _Normalize, *, masks: bool):
        super().__init__()
        self.model, self.normalize, self.masks = model, normalize, masks

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:  # noqa: D102
        det = self.model([self.normalize(images)[0]])[0]
        out = (det["boxes"], det["labels"], det["scores"])
        return (*out, det["masks"]) if self.masks else out


class RCNNGraph(nn.Module):
    """R-CNN on given proposals: ``images [1, 3, S, S]``, ``proposals [R, 4]`` -> ``boxes, labels, scores``.

    The same steps as ``RCNN.forward`` after its selective search: warp every region (RoIAlign),
    CNN features, SVM scores (sigmoid), class-specific box regression, per-class NMS.
    """

    def __init__(self, model: nn.Module, normalize: _Normalize):
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, images: Tensor, proposals: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # noqa: D102
        from components.ops.boxes import postprocess_detections

        m = self.model
        size = (int(images.shape[-2]), int(images.shape[-1]))
        image_list, _ = m.transform([self.normalize(images)[0]])
        props = _scale_proposals_traced(proposals, size, image_list.image_sizes[0])
        rois = torch.cat([torch.zeros_like(props[:, :1]), props], dim=1)
        features = m.extract_features(m.warp_regions(image_list.tensors, rois))
        scores = torch.sigmoid(m.classify(features))[:, 1:]  # [R, K]
        deltas = m.regress_boxes(features)  # [R, K, 4]
        k = m.num_classes
        anchors = props[:, None, :].expand(-1, k, 4).reshape(-1, 4)
        boxes = m.box_coder.decode_single(deltas.reshape(-1, 4), anchors)
        labels = (torch.zeros_like(scores, dtype=torch.int64) + torch.arange(1, k + 1, dtype=torch.int64)).reshape(-1)
        boxes, kept, labels = postprocess_detections(boxes, scores.reshape(-1), labels, score_threshold=m.score_threshold,
                                                     nms_iou=m.nms_iou, max_detections=m.max_detections, image_size=image_list.image_sizes[0])
        det = m.transform.postprocess([{"boxes": boxes, "scores": kept, "labels": labels}], image_list.image_sizes, [size])[0]
        return det["boxes"], det["labels"], det["scores"]


class FastRCNNGraph(RCNNGraph):
    """Fast R-CNN on given proposals: one backbone pass, RoI pooling, torchvision's ``RoIHeads`` with its post-processing."""

    def forward(self, images: Tensor, proposals: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # noqa: D102
        m = self.model
        size = (int(images.shape[-2]), int(images.shape[-1]))
        image_list, _ = m.transform([self.normalize(images)[0]])
        props = _scale_proposals_traced(proposals, size, image_list.image_sizes[0])
        detections, _ = m.roi_heads(m.extract_features(image_list.tensors), [props], image_list.image_sizes)
        det = m.transform.postprocess(detections, image_list.image_sizes, [size])[0]
        return det["boxes"], det["labels"], det["scores"]


def _scale_proposals_traced(proposals: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """Proposals in the input's pixels -> the transformed image's (``_scale_proposals`` of one image)."""
    from torchvision.models.detection.transform import resize_boxes

    return resize_boxes(proposals, list(old), list(new))


# --------------------------------------------------------------------------- export


def _graph_for(model: nn.Module, ckpt: dict[str, Any]) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """The graph module, the family part of the metadata and the output names for one checkpoint."""
    task, name = str(ckpt["task"]), str(ckpt["model_name"])
    normalize = _Normalize(ckpt.get("mean"), ckpt.get("std"))
    if name in PROPOSAL_GRAPHS:
        from dataclasses import asdict

        proposer = model.proposer
        family = {"postprocess": "in_graph", "batch": "per_image",
                  "proposals": {"method": "selective_search", "params": asdict(proposer.params),
                                "input": "proposals: float32 [R, 4] xyxy, in the pixels of the image given to predict"}}
        graph = (RCNNGraph if name == "rcnn" else FastRCNNGraph)(model, normalize)
        return graph, family, ["boxes", "labels", "scores"]
    if task == "backbone":
        return BackboneGraph(model, normalize), {"postprocess": "embedding", "batch": "dynamic"}, ["embedding"]
    if task == "classification":
        return ClassifierGraph(model, normalize), {"postprocess": "softmax", "batch": "dynamic"}, ["probabilities"]
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    if task == "segmentation" and not (isinstance(model, GeneralizedRCNN) or "mask" in name):
        return SemanticGraph(model, normalize), {"postprocess": "argmax", "batch": "dynamic"}, ["logits"]
    from components.models.overfeat import OverFeat, SlidingWindowDetector
    from components.models.yolo_v1 import YOLOv1

    nms = {"score_threshold": float(getattr(model, "score_threshold", 0.0)), "nms_iou": float(getattr(model, "nms_iou", 0.5)),
           "max_detections": int(getattr(model, "max_detections", 100))}
    if isinstance(model, YOLOv1):
        return YoloGraph(model, normalize), {"postprocess": "nms", "batch": "dynamic", **nms}, ["boxes", "scores"]
    if isinstance(model, SlidingWindowDetector):
        return SlidingWindowGraph(model, normalize), {"postprocess": "nms", "batch": "dynamic", **nms}, ["boxes", "scores"]
    if isinstance(model, OverFeat):
        merge = {"merge_iou": float(model.merge_iou), "pre_merge_top_n": int(model.pre_merge_top_n)}
        return OverFeatGraph(model, normalize), {"postprocess": "nms", "batch": "dynamic", **nms, **merge}, ["boxes", "scores"]
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    side = int(ckpt.get("image_size") or 0)
    if isinstance(model, (SSD, RetinaNet)) and side:
        tv = {"score_threshold": float(model.score_thresh), "nms_iou": float(model.nms_thresh),
              "max_detections": int(model.detections_per_img), "topk_candidates": int(model.topk_candidates)}
        if isinstance(model, SSD):
            return SSDGraph(model, normalize, side), {"postprocess": "topk_per_class", "batch": "dynamic", **tv}, ["boxes", "scores"]
        graph = RetinaNetGraph(model, normalize, side)
        return graph, {"postprocess": "topk_per_level", "batch": "dynamic", "level_sizes": graph.level_sizes, **tv}, ["boxes", "scores"]
    if hasattr(model, "transform") and hasattr(model, "backbone"):
        masks = task == "segmentation"
        outputs = ["boxes", "labels", "scores", *(["masks"] if masks else [])]
        return TorchvisionGraph(model, normalize, masks=masks), {"postprocess": "in_graph", "batch": "per_image"}, outputs
    raise ExportError(f"no ONNX export for {task} model {name!r} ({type(model).__name__})", record=name,
                      fix=f"exportable models: {sorted(POSTPROCESS)}")


def export_model(model: nn.Module, ckpt: dict[str, Any], path: str | Path, *, opset: int = OPSET) -> dict[str, Any]:
    """Export a rebuilt model (eval mode) to ``path``; returns the ``visionflow`` metadata written into it.

    Args:
        model: the network, as ``load_model`` returns it.
        ckpt: its checkpoint dict (``task``, ``model_name``, ``categories``, ``image_size``, ...).
        path: the ``.onnx`` file to write (atomically).
        opset: ONNX opset (>= 16 for ``RoiAlign`` with ``aligned``).

    Raises:
        ExportError: a model with no ONNX graph here, a checkpoint without ``image_size`` for a
            fixed-size graph, or the exporter failed.
    """
    import onnx

    graph, family, outputs = _graph_for(model.eval(), ckpt)
    graph.eval()  # the exporter restores the wrapper's mode afterwards, recursively: a new module is in training mode
    size = ckpt.get("image_size") or (ckpt.get("model_args") or {}).get("image_size")
    if size is None and family["postprocess"] not in ("argmax", "softmax", "embedding"):
        raise ExportError("the checkpoint has no image_size: a detector's graph needs its input size", record=str(ckpt["model_name"]),
                          fix="export a checkpoint written by `visionflow detect` / `visionflow segment`")
    side = int(size) if size else 64
    gen = torch.Generator().manual_seed(0)
    example: tuple[Tensor, ...] = (torch.rand(1 if family["batch"] == "per_image" else 2, 3, side, side, generator=gen),)
    inputs = ["images"]
    dynamic = {"images": {0: "batch"}, **{o: {0: "batch"} for o in outputs}} if family["batch"] == "dynamic" else None
    if "proposals" in family:  # R proposals per image: a dynamic first axis
        corners = torch.rand(24, 2, 2, generator=gen) * (side - 8)
        example = (*example, torch.cat([corners.min(1).values, corners.max(1).values + 6], dim=1))
        inputs.append("proposals")
        dynamic = {"proposals": {0: "proposals"}}
    if dynamic is not None and size is None:
        dynamic["images"].update({2: "height", 3: "width"})
    meta = {
        "format_version": FORMAT_VERSION,
        "task": str(ckpt["task"]),
        "model_name": str(ckpt["model_name"]),
        "categories": [str(c) for c in ckpt.get("categories") or []],
        "image_size": int(size) if size else None,
        "eval_crop": float(ckpt["eval_crop"]) if ckpt.get("eval_crop") is not None else None,
        "input": "images: float32 [N, 3, S, S], RGB in [0, 1], resized with torch's antialiased bilinear interpolate "
                 "(align_corners=False; with eval_crop: shorter side to round(S / eval_crop), then the centre S x S); "
                 "normalisation is in the graph",
        "normalization": {"mean": ckpt.get("mean"), "std": ckpt.get("std")},
        "record_score_threshold": float(ckpt.get("score_threshold", 0.0) or 0.0),
        "mask_threshold": float(ckpt.get("mask_threshold", 0.5) or 0.5),
        "outputs": outputs,
        "postprocess_where": POSTPROCESS.get(str(ckpt["model_name"]), POSTPROCESS.get(str(ckpt["task"]), "")),
        **family,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings of torchvision's size arithmetic: the graph is checked by the tests
            torch.onnx.export(graph, example, str(tmp), dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes=dynamic, do_constant_folding=True)
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta)
        proto.producer_name = "visionflow"
        onnx.checker.check_model(proto)
        atomic_write_bytes(path, proto.SerializeToString())
    except (RuntimeError, ValueError, TypeError, onnx.checker.ValidationError) as err:
        raise ExportError(f"ONNX export of {ckpt['model_name']} failed: {str(err).splitlines()[0][:300]}", file=path,
                          record=str(ckpt["model_name"]), fix="report it with the checkpoint; the pyfunc still serves the model") from None
    finally:
        tmp.unlink(missing_ok=True)
    return meta


def export_onnx(checkpoint: str | Path, out_dir: str | Path, *, name: str | None = None, opset: int = OPSET) -> ExportResult:
    """Rebuild the model of ``checkpoint`` and write ``out_dir/<name or model_name>.onnx``.

    Raises:
        CheckpointError: the checkpoint cannot rebuild its model.
        ExportError: see :func:`export_model`.
    """
    from components.engine import load_model

    start = time.perf_counter()
    model, ckpt = load_model(checkpoint)
    path = Path(out_dir) / f"{name or ckpt['model_name']}.onnx"
    meta = export_model(model, ckpt, path, opset=opset)
    return ExportResult(path=path, metadata=meta, seconds=time.perf_counter() - start)


def parse_model_uri(uri: str) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> ``(NAME, ALIAS or VERSION)``.

    Raises:
        ConfigError: another form (the message shows the accepted ones).
    """
    ref = uri.removeprefix("models:/")
    name, sep, version = ref.partition("@") if "@" in ref else ref.rpartition("/")
    if not uri.startswith("models:/") or not name or not sep or not version:
        raise ConfigError(f"cannot read the model reference {uri!r}", record="--model",
                          fix="give models:/NAME@ALIAS, models:/NAME/VERSION or the path of a checkpoint (.pt)")
    return name, version


def export_reference(model: str, out_dir: str | Path, *, tracking: Any = None, fmt: str = "onnx") -> dict[str, Any]:
    """``visionflow export``: a registered version (``models:/NAME@ALIAS|VERSION``) or a checkpoint to ONNX.

    A registered version's checkpoint is downloaded from the registry and exported to
    ``out_dir/NAME-vVERSION.onnx``; when the version has no ONNX artifact yet (registered before
    export existed, or with ``register.onnx: false``), the file is also logged to the version's
    register run and the version tagged with it (``components.tracking.ONNX_TAG``).

    Args:
        model: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a checkpoint path.
        out_dir: the folder for the ``.onnx`` file.
        tracking: the ``TrackingConfig`` of the registry (models:/ references only).
        fmt: the export format; only ``onnx``.

    Returns:
        ``{"model", "onnx", "seconds", "task", "postprocess", "batch", "version"?, "onnx_artifact"?, "attached"?}``.

    Raises:
        ConfigError: an unknown format or a malformed reference.
        CheckpointError / ExportError / TrackingError: as the steps above.
    """
    if fmt != "onnx":
        raise ConfigError(f"unknown export format {fmt!r}", record="--format", fix="use --format onnx")
    out_dir = Path(out_dir)
    if not model.startswith("models:/"):
        if not Path(model).is_file():
            raise CheckpointError("checkpoint not found", file=model, fix="give models:/NAME@ALIAS or the path of a stage's best.pt")
        result = export_onnx(model, out_dir)
        return {"model": model, "onnx": str(result.path), "seconds": round(result.seconds, 2), **_summary(result.metadata)}
    from components import tracking as registry

    name, ref = parse_model_uri(model)
    if tracking is not None:
        registry.connect(tracking)
    info = registry.resolve_version(name, ref)
    with tempfile.TemporaryDirectory(prefix="visionflow-export-") as tmp:
        checkpoint = registry.download_version_checkpoint(name, info.version, tmp)
        result = export_onnx(checkpoint, out_dir, name=f"{name}-v{info.version}")
    entry = {"model": model, "version": info.version, "onnx": str(result.path), "seconds": round(result.seconds, 2), **_summary(result.metadata)}
    attached = info.tags.get(registry.ONNX_TAG)
    if attached is None:
        attached = registry.attach_onnx(name, info.version, result.path)
        entry["attached"] = True
    return {**entry, "onnx_artifact": attached}


def _summary(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in ("task", "model_name", "postprocess", "batch", "image_size")}


def selective_search_proposals(meta: dict[str, Any], images: Sequence[Any]) -> list[Any]:
    """The proposals an R-CNN / Fast R-CNN graph needs, as the pyfunc computes them (torch side).

    The pyfunc's model runs selective search on the image resized to ``S x S``; this does the same
    with the parameters stored in the graph (``meta["proposals"]["params"]``) and returns the boxes
    in each input image's pixels, which ``OnnxPredictor.predict(images, proposals=...)`` maps back.

    Args:
        meta: ``OnnxPredictor.meta`` of an R-CNN or Fast R-CNN graph.
        images: ``H x W x 3`` uint8 RGB arrays.

    Returns:
        per image, float32 ``[R, 4]`` xyxy boxes.
    """
    import numpy as np

    from components.models.rcnn_lineage import SelectiveSearchProposer
    from components.ops.selective_search import SelectiveSearchParams
    from components.stages.predict import _resize, decode_image

    raw = meta["proposals"]["params"]
    params = SelectiveSearchParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    proposer, side = SelectiveSearchProposer(params, None), int(meta["image_size"])
    out = []
    for image in images:
        h, w = image.shape[:2]
        x = _resize(decode_image(image), side)  # the pixels ImagePredictor gives the model, to the last bit
        boxes = proposer([x])[0].numpy()
        out.append((boxes * np.asarray([w / side, h / side] * 2, dtype=np.float32)).astype(np.float32))
    return out
