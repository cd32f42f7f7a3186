"""The torch-free consumer of an exported model: onnxruntime, numpy and Pillow, nothing else.

This module imports only the standard library, numpy, Pillow and onnxruntime (no torch, no other
``components`` module), so it can be copied next to an ``.onnx`` file onto a machine that has
only those. :class:`OnnxPredictor` reproduces :class:`components.stages.predict.ImagePredictor`
(the registered pyfunc's engine) around the graph that :mod:`components.export.onnx_export` wrote:

* pre-processing, described by the graph's ``visionflow`` metadata (``metadata_props``): each
  ``H x W x 3`` uint8 RGB image becomes float32 in [0, 1] and is resized to
  ``image_size x image_size`` with the antialiased bilinear filter of
  ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False, antialias=True)``
  (:func:`resize_bilinear`, the same weights); a classifier whose metadata has ``eval_crop`` is
  resized on its shorter side to ``round(image_size / eval_crop)`` and centre-cropped to
  ``image_size`` (:func:`resize_center_crop`, torchvision's ``Resize(int)`` + ``CenterCrop``
  arithmetic); the normalisation (mean/std) is inside the graph;
* post-processing, per ``postprocess`` in the metadata:

  - ``softmax`` (classification): the graph returns probabilities ``[N, K]``; label = argmax;
  - ``embedding`` (backbone): the graph returns ``[N, C]`` pooled features;
  - ``argmax`` (semantic segmentation): the graph returns logits ``[N, K+1, h, w]``, resized here
    to each input's size (bilinear, as ``ImagePredictor``) and arg-maxed;
  - ``nms`` (YOLO v1, the sliding window, OverFeat): the graph returns candidate boxes
    ``[N, M, 4]`` (xyxy pixels of the network input) and per-class scores ``[N, M, K]``; the
    threshold, the optional greedy merge (OverFeat) and the per-class NMS run here
    (:func:`select_detections`, :func:`batched_nms`);
  - ``topk_per_class`` (SSD) / ``topk_per_level`` (RetinaNet): the same outputs for every anchor;
    torchvision's threshold, top-k and NMS run here (:func:`select_topk_per_class`,
    :func:`select_topk_per_level`);
  - ``in_graph`` (Faster R-CNN, Mask R-CNN): the graph holds torchvision's whole
    post-processing and takes one image ``[1, 3, S, S]``; :meth:`OnnxPredictor.predict` runs it
    once per image. R-CNN and Fast R-CNN too, with a second input ``proposals [R, 4]``: their
    selective search is not a graph, so ``predict(images, proposals=...)`` takes each image's boxes.

Records have the keys and meaning of ``ImagePredictor.predict``: classification
``{label, score, probabilities}``; backbone ``{embedding}``; detection ``{boxes (xyxy, input
pixels), labels (names), scores}``; semantic segmentation ``{mask: [[class id]]}`` at the input
size; instance segmentation adds ``masks``: COCO compressed RLE ``{size, counts}`` per instance
(:func:`encode_rle`, pycocotools' string format).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

METADATA_KEY = "visionflow"
TASKS = ("classification", "backbone", "detection", "segmentation")


# --------------------------------------------------------------------------- resizing (torch's weights)


@functools.lru_cache(maxsize=64)
def _aa_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """Weights ``[out, in]`` of torch's antialiased bilinear resize (``align_corners=False``).

    ATen's ``HelperInterpLinear::compute_index_ranges_weights`` with ``antialias=True`` (itself
    Pillow's filter): a triangle filter of support ``scale`` when shrinking (1 when enlarging),
    centred at ``scale * (i + 0.5)``, normalised to sum 1 per output pixel.
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        j = np.arange(xmin, xmax)
        w = np.clip(1.0 - np.abs((j - center + 0.5) * invscale), 0.0, None)
        total = w.sum()
        weights[i, xmin:xmax] = w / total if total > 0 else w
    return weights.astype(np.float32)


@functools.lru_cache(maxsize=64)
def _bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """Weights ``[out, in]`` of torch's plain bilinear resize (``align_corners=False``, no antialias)."""
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size), dtype=np.float32)
    src = np.maximum(scale * (np.arange(out_size) + 0.5) - 0.5, 0.0)
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0, 0.0, 1.0).astype(np.float32)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, i0), 1.0 - lam)
    np.add.at(weights, (rows, i1), lam)
    return weights


@functools.lru_cache(maxsize=128)
def _taps(in_size: int, out_size: int, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero weights of each output pixel: indices ``[out, T]`` and weights ``[out, T]`` (zero-padded)."""
    dense = (_aa_bilinear_weights if antialias else _bilinear_weights)(in_size, out_size)
    count = max(int((dense != 0).sum(axis=1).max()), 1)
    first = np.argmax(dense != 0, axis=1)
    index = np.minimum(first[:, None] + np.arange(count)[None, :], in_size - 1)
    weight = np.take_along_axis(dense, index, axis=1) * (first[:, None] + np.arange(count)[None, :] < in_size)
    return index, weight.astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple[int, int], *, antialias: bool = True) -> np.ndarray:
    """Resize channels-first float32 ``[C, H, W]`` to ``[C, h, w]`` as ``torch.nn.functional.interpolate``.

    Separable, as ATen does it: each output column (then row) is the weighted sum of the few input
    pixels under its filter (:func:`_taps`), so the cost is ``C * H * w * T + C * h * w * T`` for
    ``T`` taps (2 when enlarging, about ``2 * scale`` when shrinking).

    Args:
        image: float32 array ``[C, H, W]``.
        size: ``(h, w)``.
        antialias: ``True`` = ``antialias=True`` (the predictor's input resize), ``False`` = plain
            bilinear (the segmentation logits' resize back to the input size).
    """
    h, w = size
    image = np.asarray(image, dtype=np.float32)
    if image.shape[-2:] == (h, w):
        return image
    xi, xw = _taps(image.shape[-1], w, antialias)
    yi, yw = _taps(image.shape[-2], h, antialias)
    cols = np.einsum("chwt,wt->chw", image[:, :, xi], xw)  # [C, H, w]
    return np.einsum("cytw,yt->cyw", cols[:, yi, :], yw)  # [C, h, w]


def resize_center_crop(image: np.ndarray, image_size: int, eval_crop: float) -> np.ndarray:
    """``v2.CenterCrop(S)(v2.Resize(round(S / eval_crop))(image))`` for channels-first float32 ``[C, H, W]``.

    The shorter side becomes ``round(S / eval_crop)`` and the longer ``int(side * long / short)``
    (torchvision's rounding), then the centre ``S x S`` square, offsets ``int(round((H' - S) / 2))``.
    """
    h, w = image.shape[-2:]
    side = round(image_size / eval_crop)
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(side * long / short)
    out_h, out_w = (new_long, side) if w <= h else (side, new_long)
    resized = resize_bilinear(image, (out_h, out_w), antialias=True)
    top, left = int(round((out_h - image_size) / 2.0)), int(round((out_w - image_size) / 2.0))
    return np.ascontiguousarray(resized[:, top : top + image_size, left : left + image_size])


# --------------------------------------------------------------------------- boxes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[n, m]`` of xyxy boxes ``a [n, 4]`` and ``b [m, 4]`` (torchvision's ``box_iou``)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS, by decreasing score (``torchvision.ops.nms``: IoU > threshold suppresses)."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(boxes), dtype=bool)
    iou = box_iou(boxes, boxes) if len(boxes) else np.zeros((0, 0), np.float32)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= iou[i] > iou_threshold
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Per-class NMS (``torchvision.ops.batched_nms``): kept indices sorted by decreasing score."""
    keep = [np.flatnonzero(labels == c)[nms(boxes[labels == c], scores[labels == c], iou_threshold)] for c in np.unique(labels)]
    if not keep:
        return np.zeros(0, dtype=np.int64)
    kept = np.concatenate(keep)
    return kept[np.argsort(-scores[kept], kind="stable")]


def greedy_merge(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, *, iou_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OverFeat's greedy merge (``components.models.overfeat.greedy_merge`` in numpy).

    Per class, the best-matching pair (highest IoU) is replaced by its score-weighted mean box
    with the pair's best score, until no pair reaches ``iou_threshold``; sorted by decreasing score.
    """
    out_b, out_s, out_l = [], [], []
    for cls in np.unique(labels):
        b, s = boxes[labels == cls].copy(), scores[labels == cls].copy()
        weight = s.copy()
        while len(b) > 1:
            iou = box_iou(b, b)
            np.fill_diagonal(iou, -1.0)
            i, j = divmod(int(iou.argmax()), len(b))
            if iou[i, j] < iou_threshold:
                break
            w = weight[i] + weight[j]
            merged = (weight[i] * b[i] + weight[j] * b[j]) / max(w, 1e-12)
            rest = np.ones(len(b), dtype=bool)
            rest[[i, j]] = False
            b = np.concatenate([b[rest], merged[None].astype(b.dtype)])
            s = np.concatenate([s[rest], np.maximum(s[i], s[j])[None]])
            weight = np.concatenate([weight[rest], np.asarray([w], dtype=weight.dtype)])
        out_b.append(b)
        out_s.append(s)
        out_l.append(np.full(len(b), cls, dtype=labels.dtype))
    if not out_b:
        return boxes[:0], scores[:0], labels[:0]
    b, s, lab = np.concatenate(out_b), np.concatenate(out_s), np.concatenate(out_l)
    order = np.argsort(-s, kind="stable")
    return b[order], s[order], lab[order]


def select_detections(boxes: np.ndarray, scores: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``nms`` post-processing of one image: threshold, valid boxes, optional greedy merge, per-class NMS.

    Args:
        boxes: ``[M, 4]`` candidate xyxy boxes (network-input pixels).
        scores: ``[M, K]`` per-class scores (class ``k`` = label ``k + 1``).
        meta: the graph's metadata (``score_threshold``, ``nms_iou``, ``max_detections``, optional
            ``merge_iou`` and ``pre_merge_top_n`` for OverFeat's merge).

    Returns:
        ``(boxes [m, 4], scores [m], labels [m] in 1..K)`` sorted by decreasing score.
    """
    k = scores.shape[1]
    flat = scores.reshape(-1)
    keep = np.flatnonzero(flat > meta["score_threshold"])
    b, s, lab = boxes[keep // k], flat[keep], keep % k + 1
    valid = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    b, s, lab = b[valid], s[valid], lab[valid]
    if meta.get("merge_iou") is not None:
        top = np.argsort(-s, kind="stable")[: int(meta["pre_merge_top_n"])]
        b, s, lab = greedy_merge(b[top], s[top], lab[top], iou_threshold=float(meta["merge_iou"]))
    kept = batched_nms(b, s, lab, float(meta["nms_iou"]))[: int(meta["max_detections"])]
    return b[kept], s[kept], lab[kept]


def select_topk_per_class(boxes: np.ndarray, scores: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SSD's post-processing of one image (``torchvision SSD.postprocess_detections``).

    Per class: scores above ``score_threshold``, the ``topk_candidates`` best; then per-class NMS
    over all classes and the ``max_detections`` best.

    Args:
        boxes: ``[A, 4]`` decoded, clipped boxes; scores: ``[A, K]`` softmax scores of classes 1..K.
    """
    out_b, out_s, out_l = [], [], []
    for k in range(scores.shape[1]):
        keep = np.flatnonzero(scores[:, k] > meta["score_threshold"])
        top = keep[np.argsort(-scores[keep, k], kind="stable")[: int(meta["topk_candidates"])]]
        out_b.append(boxes[top])
        out_s.append(scores[top, k])
        out_l.append(np.full(len(top), k + 1, dtype=np.int64))
    return _nms_top(np.concatenate(out_b), np.concatenate(out_s), np.concatenate(out_l), meta)


def select_topk_per_level(boxes: np.ndarray, scores: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RetinaNet's post-processing of one image (``torchvision RetinaNet.postprocess_detections``).

    Per pyramid level (``meta["level_sizes"]`` anchors each): the (anchor, class) pairs scoring
    above ``score_threshold``, the ``topk_candidates`` best; label = class column; then per-class
    NMS over all levels and the ``max_detections`` best.

    Args:
        boxes: ``[A, 4]`` decoded, clipped boxes; scores: ``[A, C]`` sigmoid scores (column = label).
    """
    classes = scores.shape[1]
    out_b, out_s, out_l, start = [], [], [], 0
    for size in meta["level_sizes"]:
        flat = scores[start : start + size].reshape(-1)
        keep = np.flatnonzero(flat > meta["score_threshold"])
        top = keep[np.argsort(-flat[keep], kind="stable")[: int(meta["topk_candidates"])]]
        out_b.append(boxes[start + top // classes])
        out_s.append(flat[top])
        out_l.append(top % classes)
        start += size
    return _nms_top(np.concatenate(out_b), np.concatenate(out_s), np.concatenate(out_l).astype(np.int64), meta)


def _nms_top(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    kept = batched_nms(boxes, scores, labels, float(meta["nms_iou"]))[: int(meta["max_detections"])]
    return boxes[kept], scores[kept], labels[kept]


# --------------------------------------------------------------------------- masks


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE ``{"size": [H, W], "counts": str}`` of a ``bool[H, W]`` mask.

    Runs are counted in column-major order starting with a run of zeros, and written with
    pycocotools' ``rleToString`` (5-bit groups, deltas from the run two back after the third),
    so the text equals ``pycocotools.mask.encode``'s.
    """
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    elif not flat.size:
        runs = [0]
    chars = []
    for i, run in enumerate(runs):
        x = int(run) - (int(runs[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return {"size": [int(h), int(w)], "counts": "".join(chars)}


# --------------------------------------------------------------------------- the predictor


class OnnxPredictor:
    """An exported visionflow model run by onnxruntime: records like ``ImagePredictor.predict``.

    Args:
        path: the ``.onnx`` file written by ``visionflow export`` (or logged by ``register``).
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``).

    Attributes:
        task: ``classification``, ``detection``, ``segmentation`` or ``backbone``.
        categories: class names; detection label ``k`` (1..K) is ``categories[k - 1]``.
        meta: the graph's ``visionflow`` metadata (pre- and post-processing, thresholds).

    Raises:
        ValueError: the file is not an ONNX graph exported by visionflow (the message says which file).
    """

    def __init__(self, path: str | Path, *, providers: list[str] | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: ONNX file not found; fix: run `visionflow export --model ... --format onnx`")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the per-image graphs' data-dependent output shapes warn on every run
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"])
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path}: no '{METADATA_KEY}' metadata; fix: export it with `visionflow export`")
        self.meta: dict[str, Any] = json.loads(raw)
        self.task: str = str(self.meta["task"])
        if self.task not in TASKS:
            raise ValueError(f"{path}: unknown task {self.task!r} in its metadata; fix: one of {TASKS}")
        self.categories: list[str] = [str(c) for c in self.meta.get("categories") or []]
        self.image_size: int | None = self.meta.get("image_size")
        self.eval_crop: float | None = self.meta.get("eval_crop") if self.task == "classification" else None
        self.postprocess: str = str(self.meta["postprocess"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.path = path

    # ---------------------------------------------------------------- pre-processing

    def preprocess(self, image: np.ndarray, *, record: str = "image") -> np.ndarray:
        """One ``H x W x 3`` uint8 RGB image -> float32 ``[3, S, S]`` in [0, 1] (``[3, H, W]`` without ``image_size``).

        Raises:
            ValueError: not an ``H x W x 3`` (or ``H x W``) uint8 array; the message names the record.
        """
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.size == 0 or arr.dtype != np.uint8:
            raise ValueError(f"{record}: expected an H x W x 3 uint8 RGB array, got {arr.dtype} {arr.shape}; "
                             "fix: np.asarray(PIL.Image.open(path).convert('RGB'))")
        x = np.ascontiguousarray(arr[:, :, :3].transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0)
        if self.image_size is not None and self.eval_crop is not None:
            x = resize_center_crop(x, int(self.image_size), float(self.eval_crop))
        elif self.image_size is not None:
            x = resize_bilinear(x, (int(self.image_size), int(self.image_size)), antialias=True)
        return x

    # ---------------------------------------------------------------- prediction

    @property
    def needs_proposals(self) -> bool:
        """R-CNN and Fast R-CNN graphs take region proposals as a second input (``meta["proposals"]``)."""
        return "proposals" in self.meta

    def predict(self, images: list[np.ndarray], *, proposals: list[np.ndarray] | None = None) -> list[dict]:
        """Predict on ``H x W x 3`` uint8 RGB arrays of any sizes; one record per image (see the module docstring).

        Args:
            images: the images.
            proposals: R-CNN / Fast R-CNN graphs only (:attr:`needs_proposals`): per image ``[R, 4]``
                xyxy boxes in that image's pixels (selective search with ``meta["proposals"]["params"]``,
                e.g. ``components.export.onnx_export.selective_search_proposals``, or any proposer).

        Raises:
            ValueError: a bad image, or proposals missing / of the wrong shape for a proposal graph.
        """
        sizes = [tuple(np.asarray(img).shape[:2]) for img in images]
        inputs = [self.preprocess(img, record=f"image {i}") for i, img in enumerate(images)]
        if not inputs:
            return []
        if self.needs_proposals:
            return self._predict_with_proposals(inputs, sizes, proposals)
        if self.meta.get("batch") == "per_image":
            outputs = [self.session.run(self.output_names, {self.input_name: x[None]}) for x in inputs]
            return [self._record_in_graph(out, size) for out, size in zip(outputs, sizes, strict=True)]
        if self.image_size is None:  # any-size graph (no resize): one run per image, as sizes differ
            outs = [self.session.run(self.output_names, {self.input_name: x[None]}) for x in inputs]
            batches = [[o[0] for o in out] for out in outs]
        else:
            out = self.session.run(self.output_names, {self.input_name: np.stack(inputs)})
            batches = [[o[i] for o in out] for i in range(len(inputs))]
        return [self._record(per_image, size) for per_image, size in zip(batches, sizes, strict=True)]

    def _predict_with_proposals(self, inputs: list[np.ndarray], sizes: list[tuple[int, int]], proposals: list[np.ndarray] | None) -> list[dict]:
        if proposals is None or len(proposals) != len(inputs):
            raise ValueError(f"{self.path}: {self.meta['model_name']} takes region proposals per image (selective search, params in "
                             "meta['proposals']); fix: predict(images, proposals=[boxes [R, 4] per image]), e.g. from "
                             "components.export.onnx_export.selective_search_proposals")
        records = []
        for i, (x, (h, w), boxes) in enumerate(zip(inputs, sizes, proposals, strict=True)):
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) if np.size(boxes) else np.asarray([[0, 0, w, h]], np.float32)
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"{self.path}: proposals of image {i} must be [R, 4] xyxy; fix: one box per row")
            side_h, side_w = x.shape[-2:]
            scaled = boxes * np.asarray([side_w / w, side_h / h] * 2, dtype=np.float32)
            out = self.session.run(self.output_names, {self.input_name: x[None], "proposals": scaled})
            records.append(self._record_in_graph(out, (h, w)))
        return records

    def _name(self, label: int) -> str:
        return self.categories[label - 1] if 0 < label <= len(self.categories) else str(label)

    def _record(self, out: list[np.ndarray], size: tuple[int, int]) -> dict[str, Any]:
        if self.postprocess == "embedding":
            return {"embedding": out[0].astype(np.float64).tolist()}
        if self.postprocess == "softmax":
            probs = out[0]
            k = int(probs.argmax())
            name = self.categories[k] if k < len(self.categories) else str(k)
            return {"label": name, "score": float(probs[k]), "probabilities": probs.astype(np.float64).tolist()}
        if self.postprocess == "argmax":
            logits = resize_bilinear(out[0], size, antialias=False)
            return {"mask": logits.argmax(0).astype(np.uint8).tolist()}
        select = {"nms": select_detections, "topk_per_class": select_topk_per_class, "topk_per_level": select_topk_per_level}
        if self.postprocess in select:
            boxes, scores, labels = select[self.postprocess](out[0], out[1], self.meta)
            return self._detection_record(boxes, scores, labels, None, size)
        raise ValueError(f"{self.path}: unknown post-processing {self.postprocess!r}; fix: re-export with this visionflow")

    def _record_in_graph(self, out: list[np.ndarray], size: tuple[int, int]) -> dict[str, Any]:
        named = dict(zip(self.output_names, out, strict=True))
        return self._detection_record(named["boxes"], named["scores"], named["labels"], named.get("masks"), size)

    def _detection_record(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, masks: np.ndarray | None,
                          size: tuple[int, int]) -> dict[str, Any]:
        """Boxes back in the input image's pixels, names for labels, RLE masks: ``ImagePredictor._detection_record``."""
        h, w = size
        boxes = boxes.astype(np.float32)
        if self.image_size is not None:
            boxes = boxes * np.asarray([w / self.image_size, h / self.image_size] * 2, dtype=np.float32)
        keep = scores >= float(self.meta.get("record_score_threshold", 0.0))
        record: dict[str, Any] = {
            "boxes": [[round(float(v), 2) for v in b] for b in boxes[keep]],
            "labels": [self._name(int(c)) for c in labels[keep]],
            "scores": [round(float(s), 5) for s in scores[keep]],
        }
        if masks is not None:
            threshold = float(self.meta.get("mask_threshold", 0.5))
            record["masks"] = [encode_rle(resize_bilinear(m, (h, w), antialias=False)[0] >= threshold) for m in masks[keep]]
        return record
