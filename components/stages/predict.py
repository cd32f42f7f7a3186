"""Inference on image files: the ``visionflow predict`` stage and the engine of every served model.

:class:`ImagePredictor` rebuilds a model from its checkpoint alone (``components.engine.load_model``)
and turns a batch of images into plain, JSON-ready predictions per task:

* backbone: ``{"embedding": [C floats]}`` (global-average-pooled last feature map);
* classification: ``{"label": name, "score": p, "probabilities": [K floats]}`` (softmax over the logits);
* detection: ``{"boxes": [[x1, y1, x2, y2], ...] (xyxy pixels of the input image), "labels": [names],
  "scores": [floats]}``;
* semantic segmentation: ``{"mask": [[class index per pixel]]}`` (H x W of the input, 0 = background,
  k = category k);
* instance segmentation: the detection record plus ``"masks"``: one COCO RLE ``{size, counts}`` per instance.

The MLflow pyfunc wrappers registered by :mod:`components.tracking` delegate to this class, so the
registry, ``mlflow models serve`` and ``visionflow predict --model PATH.pt`` all give the same answer.
Images are accepted as encoded bytes (PNG/JPEG), base64 text of those bytes (what JSON carries), or
numpy arrays ``[H, W]`` / ``[H, W, 3|4]`` (uint8 0..255 or float 0..1).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from components.errors import CheckpointError, DataError
from components.io import write_json

PREDICTION_TASKS = ("backbone", "classification", "detection", "segmentation")


# --------------------------------------------------------------------------- image decoding


def decode_image(value: Any, *, record: object = None) -> Tensor:
    """One image as ``Tensor[3, H, W]`` float in [0, 1].

    Args:
        value: encoded PNG/JPEG bytes, their base64 text, a numpy array ``[H, W]`` or ``[H, W, C]``
            (C = 1, 3 or 4; uint8 0..255 or float 0..1), or a nested list of the same.
        record: which image of the batch (for the error message).

    Raises:
        DataError: the value is not an image.
    """
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise DataError(
                "text input is not base64", record=record, fix="send the image file's bytes base64-encoded, or a pixel array"
            ) from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(value))) as pil:
                arr = np.asarray(pil.convert("RGB"))
        except (OSError, ValueError) as err:
            raise DataError(f"cannot decode image bytes ({err})", record=record, fix="send PNG or JPEG bytes") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        arr = np.asarray([], dtype=np.uint8)
    if arr.dtype == object or arr.ndim not in (2, 3) or arr.size == 0:
        raise DataError(
            f"not an image: got {type(value).__name__} with shape {getattr(arr, 'shape', None)}",
            record=record,
            fix="send encoded image bytes or an array [H, W] / [H, W, 3]",
        )
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] not in (1, 3, 4):
        raise DataError(f"image array has {arr.shape[2]} channels", record=record, fix="send an array [H, W, 3] (HWC, RGB)")
    tensor = torch.from_numpy(np.ascontiguousarray(arr[:, :, :3])).permute(2, 0, 1)
    tensor = tensor.float() / 255.0 if arr.dtype == np.uint8 else tensor.float().clamp(0.0, 1.0)
    return tensor.expand(3, -1, -1).contiguous() if tensor.shape[0] == 1 else tensor


def _resize(image: Tensor, size: int | None) -> Tensor:
    if size is None or tuple(image.shape[-2:]) == (size, size):
        return image
    return torch.nn.functional.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


# --------------------------------------------------------------------------- the predictor


class ImagePredictor:
    """A model rebuilt from its checkpoint, with the pre- and post-processing of its task.

    Preprocessing is what the checkpoint says: images are resized to ``image_size`` (square, the
    training size) when the checkpoint records one, and normalised with ``mean``/``std`` when it
    records them; detection boxes and segmentation masks are mapped back to each input's own size.

    Args:
        model: the network, in eval mode.
        ckpt: the checkpoint dict (``task``, ``model_name``, ``categories``, optional ``image_size``,
            ``mean``, ``std``, ``score_threshold``, ``mask_threshold``).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, model: torch.nn.Module, ckpt: dict[str, Any], *, device: str = "auto"):
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        self.model = model.to(self.device).eval()
        self.ckpt = ckpt
        self.task: str = str(ckpt.get("task", "classification"))
        if self.task not in PREDICTION_TASKS:
            raise CheckpointError(f"unknown task {self.task!r} in checkpoint", record="task", fix=f"one of {PREDICTION_TASKS}")
        self.categories: list[str] = [str(c) for c in (ckpt.get("categories") or [])]
        size = ckpt.get("image_size") or (ckpt.get("model_args") or {}).get("image_size")
        self.image_size: int | None = int(size) if size else None
        self.mean = ckpt.get("mean")
        self.std = ckpt.get("std")
        self.score_threshold = float(ckpt.get("score_threshold", 0.0) or 0.0)
        self.mask_threshold = float(ckpt.get("mask_threshold", 0.5) or 0.5)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "auto") -> ImagePredictor:
        """Rebuild from the file alone (``components.engine.load_model``).

        Raises:
            CheckpointError: the file is missing or is not a visionflow checkpoint.
        """
        from components.engine import load_model

        path = Path(path)
        if not path.is_file():
            raise CheckpointError("checkpoint not found", file=path, fix="give a models:/ URI or the path of a stage's best.pt")
        model, ckpt = load_model(path)
        return cls(model, ckpt, device=device)

    def _label(self, index: int) -> str:
        """Category name of a 1..K detection label (0..K-1 for classification is handled by the caller)."""
        return self.categories[index - 1] if 0 < index <= len(self.categories) else str(index)

    def _prepare(self, image: Tensor) -> Tensor:
        x = _resize(image, self.image_size)
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
            x = (x - mean) / std
        return x

    @torch.inference_mode()
    def predict(self, images: Sequence[Any], *, batch_size: int = 16) -> list[dict[str, Any]]:
        """Predict on a batch of images (any mix of the accepted input kinds); one record per image.

        Raises:
            DataError: an input is not an image (the message names its index).
        """
        decoded = [decode_image(v, record=f"image {i}") for i, v in enumerate(images)]
        out: list[dict[str, Any]] = []
        for start in range(0, len(decoded), batch_size):
            chunk = decoded[start : start + batch_size]
            out.extend(self._predict_chunk(chunk))
        return out

    def _predict_chunk(self, images: list[Tensor]) -> list[dict[str, Any]]:
        sizes = [tuple(img.shape[-2:]) for img in images]
        batch = [self._prepare(img).to(self.device) for img in images]
        if self.task == "backbone":
            feats = self.model.forward_features(torch.stack(batch))  # type: ignore[operator]
            return [{"embedding": f.mean(dim=(-2, -1)).cpu().tolist()} for f in feats]
        if self.task == "classification":
            probs = torch.softmax(self.model(torch.stack(batch)).float(), dim=1).cpu()
            records = []
            for p in probs:
                k = int(p.argmax())
                name = self.categories[k] if k < len(self.categories) else str(k)
                records.append({"label": name, "score": float(p[k]), "probabilities": p.tolist()})
            return records
        if self.task == "segmentation" and not self._is_instance_model():
            logits = self.model(torch.stack(batch)).float()  # [N, K+1, h, w]
            records = []
            for lg, (h, w) in zip(logits, sizes, strict=True):
                lg = torch.nn.functional.interpolate(lg[None], size=(h, w), mode="bilinear", align_corners=False)[0]
                records.append({"mask": lg.argmax(0).to(torch.uint8).cpu().tolist()})
            return records
        return [self._detection_record(det, size) for det, size in zip(self.model(batch), sizes, strict=True)]

    def _is_instance_model(self) -> bool:
        from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

        return isinstance(self.model, GeneralizedRCNN) or "mask" in str(self.ckpt.get("model_name", ""))

    def _detection_record(self, det: dict[str, Tensor], size: tuple[int, int]) -> dict[str, Any]:
        """Boxes back in the input image's pixels (xyxy), names for labels, RLE for instance masks."""
        h, w = size
        boxes = det["boxes"].float().cpu()
        if self.image_size is not None:
            scale = torch.tensor([w / self.image_size, h / self.image_size] * 2)
            boxes = boxes * scale
        keep = det["scores"].cpu() >= self.score_threshold
        boxes = boxes[keep]
        record: dict[str, Any] = {
            "boxes": [[round(float(v), 2) for v in b] for b in boxes],
            "labels": [self._label(int(c)) for c in det["labels"].cpu()[keep]],
            "scores": [round(float(s), 5) for s in det["scores"].cpu()[keep]],
        }
        if "masks" in det:
            from components.data.canonical import encode_rle

            masks = det["masks"].float().cpu()[keep]  # [N, 1, h', w'] probabilities
            if len(masks):
                masks = torch.nn.functional.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)
            record["masks"] = [encode_rle((m[0] >= self.mask_threshold).numpy()) for m in masks]
        return record


# --------------------------------------------------------------------------- the stage


def _load_predictor(model_uri: str) -> tuple[Any, str]:
    """A callable ``images -> records`` for a models:/, runs:/ URI or a checkpoint path, and its kind."""
    if "://" in model_uri or model_uri.startswith(("models:/", "runs:/")):
        from components.tracking import load_pyfunc

        pyfunc = load_pyfunc(model_uri)

        def run(images: list[bytes]) -> list[dict[str, Any]]:
            import pandas as pd

            frame = pyfunc.predict(pd.DataFrame({"image": images}))
            return frame.to_dict(orient="records") if hasattr(frame, "to_dict") else list(frame)

        return run, "pyfunc"
    predictor = ImagePredictor.from_checkpoint(model_uri)
    return predictor.predict, predictor.task


def predict_files(model_uri: str, images: list[Path], *, out: Path | None = None, draw: Path | None = None) -> dict:
    """Run a registered model (``models:/NAME@ALIAS``, ``runs:/...``) or a checkpoint on image files.

    Args:
        model_uri: an MLflow model URI, or the path of a stage checkpoint (``outputs/detect/yolo/best.pt``).
        images: image files (PNG/JPEG).
        out: write ``{"model": ..., "predictions": {file: record}}`` here as JSON (atomically).
        draw: write each image with its boxes / masks / label drawn into this folder (PNG).

    Returns:
        ``{"model", "count", "predictions": {file: record}, "out", "drawn"}``.

    Raises:
        DataError: an image file is missing or not an image.
        CheckpointError / TrackingError: the model cannot be loaded.
    """
    for path in images:
        if not Path(path).is_file():
            raise DataError("image file not found", file=path, fix="give existing PNG/JPEG files")
    run, _kind = _load_predictor(model_uri)
    blobs = [Path(p).read_bytes() for p in images]
    records: list[dict[str, Any]] = []
    for i, blob in enumerate(blobs):
        try:
            records.extend(run([blob]))
        except DataError as err:
            raise DataError(err.message, file=images[i], record=err.record, fix=err.fix) from None
    predictions = {str(p): r for p, r in zip(images, records, strict=True)}
    result: dict[str, Any] = {"model": model_uri, "count": len(records), "predictions": predictions}
    if out is not None:
        write_json({"model": model_uri, "predictions": predictions}, Path(out))
        result["out"] = str(out)
    if draw is not None:
        result["drawn"] = [str(p) for p in draw_predictions(images, records, Path(draw))]
    return result


def draw_predictions(images: Sequence[Path], records: Sequence[dict[str, Any]], folder: Path, *, min_score: float = 0.25) -> list[Path]:
    """Draw each record on its image (boxes with ``label score``, masks, or the class label) as PNG.

    Only detections scoring at least ``min_score`` are drawn (the JSON output keeps them all).
    """
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for path, rec in zip(images, records, strict=True):
        img = (decode_image(Path(path).read_bytes(), record=str(path)) * 255).round().to(torch.uint8)
        if "mask" in rec:
            mask = torch.as_tensor(rec["mask"], dtype=torch.int64)
            classes = [int(c) for c in mask.unique() if 0 < int(c) < 255]
            if classes:
                img = draw_segmentation_masks(img, torch.stack([mask == c for c in classes]), alpha=0.5)
        keep = [i for i, sc in enumerate(rec.get("scores") or []) if sc >= min_score]
        if "scores" in rec:
            rec = {**rec, **{k: [rec[k][i] for i in keep] for k in ("boxes", "labels", "scores", "masks") if k in rec}}
        if rec.get("masks"):
            from pycocotools import mask as mask_utils

            binary = torch.from_numpy(mask_utils.decode([{"size": m["size"], "counts": m["counts"].encode()} for m in rec["masks"]]))
            img = draw_segmentation_masks(img, binary.permute(2, 0, 1).bool(), alpha=0.5)
        if rec.get("boxes"):
            captions = [f"{lab} {s:.2f}" for lab, s in zip(rec["labels"], rec["scores"], strict=True)]
            img = draw_bounding_boxes(img, torch.tensor(rec["boxes"], dtype=torch.float32), labels=captions, width=2)
        elif "label" in rec:
            img = draw_bounding_boxes(img, torch.tensor([[0, 0, img.shape[-1] - 1, img.shape[-2] - 1]], dtype=torch.float32),
                                      labels=[f"{rec['label']} {rec['score']:.2f}"], colors="yellow", width=1)
        target = folder / f"{Path(path).stem}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(target)
        written.append(target)
    return written


