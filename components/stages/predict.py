"""Inference on image files: the ``visionflow predict`` command and the engine of every served model.

:class:`ImagePredictor` rebuilds a model from its checkpoint alone (``components.engine.load_model``)
and turns a batch of images into plain, JSON-ready predictions per task:

* backbone: ``{"embedding": [C floats]}`` (global-average-pooled last feature map);
* classification: ``{"label": name, "score": p, "probabilities": [K floats]}`` (softmax over the logits);
* detection: ``{"boxes": [[x1, y1, x2, y2], ...] (xyxy pixels of the input image), "labels": [names],
  "scores": [floats]}``, full float precision (COCO mAP ranks by score, so nothing is rounded);
* semantic segmentation: ``{"mask": [[class index per pixel]]}`` (H x W of the input, 0 = background,
  k = category k);
* instance segmentation: the detection record plus ``"masks"``: one COCO RLE ``{size, counts}`` per instance.

Pre-processing is the stages' evaluation transform, operation for operation: uint8 pixels to float
with ``transforms.v2.functional.to_dtype(scale=True)`` (``components.data.datasets.read_image``),
then the antialiased bilinear resize to the checkpoint's ``image_size`` (``v2.Resize``; a classifier
whose checkpoint records ``eval_crop`` is resized on its shorter side and centre-cropped instead,
:func:`components.stages.pretrain.classification_eval_transform`, as the finetune stage validated it); the
detector's own score threshold and detection cap apply inside the model, nothing is filtered after
it. So ``visionflow predict`` on a test split, scored by ``visionflow evaluate``, gives the detect
stage's test numbers (``tests/test_predict.py`` checks it to 1e-6).

The MLflow pyfunc wrappers registered by :mod:`components.tracking` delegate to this class, so the
registry, ``mlflow models serve`` and ``visionflow predict --model PATH.pt`` all give the same answer.
Images are accepted as encoded bytes (PNG/JPEG/...), base64 text of those bytes (what JSON carries),
or numpy arrays ``[H, W]`` / ``[H, W, 3|4]`` (uint8 0..255, uint16 0..65535 or float 0..1).

Image conversions (files and bytes alike, :func:`image_to_rgb`):

* grey (``L``, ``1``) -> RGB by repeating the channel;
* 16-bit grey (``I;16``, ``I``) -> 8 bits, scaled by 255/65535 and rounded, then RGB (Pillow itself
  reads 16-bit-per-channel colour PNGs as 8-bit RGB);
* transparency (``RGBA``, ``LA``, ``PA``, palette or grey with a transparent colour) -> composited
  over **black** (RGB x alpha), so a transparent pixel is black whatever colour it stores;
* palette, CMYK, YCbCr and the other Pillow modes -> RGB by Pillow's conversion; multi-frame files
  (GIF, TIFF) -> their first frame; EXIF orientation is not applied (as the datasets' reader);
* a 1-pixel image is predicted like any other (resized to the model's input size);
* an image longer than :data:`MAX_SIDE` pixels on a side (a 10,000-pixel-wide panorama) is first
  shrunk to :data:`MAX_SIDE` on its long side (Pillow's antialiased bilinear) so the float tensor
  stays small; boxes and masks are mapped back to the original's pixels;
* a file Pillow cannot identify (not an image), a truncated or corrupt file, or one over Pillow's
  decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` x 2) is a :class:`DataError` naming the
  file, what is wrong and the fix; ``visionflow predict`` reports it and goes on with the others.
"""

from __future__ import annotations

import base64
import binascii
import glob
import io
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from components.errors import CheckpointError, ConfigError, DataError
from components.io import atomic_write_bytes, write_json

PREDICTION_TASKS = ("backbone", "classification", "detection", "segmentation")
#: file suffixes a folder walk picks up (compared lower-cased); a file named on the command line is always tried
IMAGE_EXTENSIONS = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
#: longest side, in pixels, an image keeps before the model (longer ones are shrunk first, outputs mapped back)
MAX_SIDE = 4096
#: what transparent pixels are composited over
ALPHA_BACKGROUND = (0, 0, 0)
#: images per forward pass: the detect and segment stages' evaluation batch (``max(train.batch_size, 8)``
#: with the default params), so the floating-point sums, and the scores, are the stage's own
DEFAULT_BATCH_SIZE = 8
#: CPU intra-op threads: every stage's ``train.threads`` in params.yaml; a convolution's sums, hence the
#: last bits of each score, depend on the thread count, and COCO AP on the order of the scores
DEFAULT_THREADS = 1


# --------------------------------------------------------------------------- image decoding


def image_to_rgb(pil: Image.Image, *, record: object = None) -> tuple[np.ndarray, list[str]]:
    """Decode a Pillow image to ``uint8[H, W, 3]`` RGB, with the conversions of the module docstring.

    Args:
        pil: an opened (possibly not yet loaded) Pillow image.
        record: what the image is (a file, ``image 3``), for the error message.

    Returns:
        ``(array uint8[H, W, 3], notes)``: ``notes`` names each conversion done (empty for RGB input).

    Raises:
        DataError: truncated or corrupt data, or an image over Pillow's decompression-bomb limit.
    """
    try:
        pil.load()
    except Image.DecompressionBombError as err:
        raise DataError(f"image too large to decode safely ({err})", record=record,
                        fix=f"downscale it below {Image.MAX_IMAGE_PIXELS * 2} pixels first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise DataError(f"truncated or corrupt image data ({err})", record=record,
                        fix="re-export or re-copy the file; it does not decode completely") from None
    mode, notes = pil.mode, []
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(pil).astype(np.float64)
        arr8 = np.round(np.clip(grey, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        notes.append(f"16-bit grey ({mode}) scaled to 8 bits")
        return np.repeat(arr8[:, :, None], 3, axis=2), notes
    if mode == "F":
        grey = np.nan_to_num(np.asarray(pil, dtype=np.float64))
        arr8 = np.round(np.clip(grey, 0.0, 1.0) * 255.0).astype(np.uint8)
        notes.append("32-bit float grey (values 0..1) scaled to 8 bits")
        return np.repeat(arr8[:, :, None], 3, axis=2), notes
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in pil.info:
        rgba = pil.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        notes.append(f"transparency ({mode}) composited over black")
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB")), notes
    if mode != "RGB":
        notes.append(f"{mode} converted to RGB")
    return np.asarray(pil.convert("RGB")), notes


def open_image_bytes(data: bytes, *, record: object = None) -> tuple[np.ndarray, list[str]]:
    """Encoded image bytes to ``uint8[H, W, 3]`` RGB and the conversion notes (see :func:`image_to_rgb`).

    Raises:
        DataError: the bytes are not an image Pillow reads, or are truncated/corrupt.
    """
    try:
        pil = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise DataError(f"image too large to decode safely ({err})", record=record,
                        fix=f"downscale it below {Image.MAX_IMAGE_PIXELS * 2} pixels first") from None
    except (OSError, SyntaxError, ValueError) as err:
        what = "not an image (Pillow cannot identify the format)" if isinstance(err, Image.UnidentifiedImageError) else f"unreadable image ({err})"
        raise DataError(what, record=record, fix="give PNG, JPEG, BMP, GIF, TIFF or WebP files") from None
    with pil:
        return image_to_rgb(pil, record=record)


def decode_image(value: Any, *, record: object = None) -> Tensor:
    """One image as ``Tensor[3, H, W]`` float in [0, 1].

    Args:
        value: encoded image bytes, their base64 text, a numpy array ``[H, W]`` or ``[H, W, C]``
            (C = 1, 3 or 4; uint8 0..255, uint16 0..65535 or float 0..1), or a nested list of the same.
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
        value, _ = open_image_bytes(bytes(value), record=record)
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
    pixels = arr[:, :, :3]
    if not (pixels.flags.c_contiguous and pixels.flags.writeable):  # Pillow's arrays are read-only
        pixels = np.array(pixels, order="C")
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)
    if arr.dtype in (np.uint8, np.uint16):  # exactly the datasets' read_image: to_dtype(scale=True) multiplies by 1/max
        tensor = F.to_dtype(tensor, torch.float32, scale=True)
    else:
        tensor = tensor.float().clamp(0.0, 1.0)
    return tensor.expand(3, -1, -1).contiguous() if tensor.shape[0] == 1 else tensor


def _resize(image: Tensor, size: int | None) -> Tensor:
    """``v2.Resize((size, size), antialias=True)`` of the stages' evaluation transform (a no-op at that size)."""
    if size is None:
        return image
    return F.resize(image, [size, size], antialias=True)


# --------------------------------------------------------------------------- the predictor


class ImagePredictor:
    """A model rebuilt from its checkpoint, with the pre- and post-processing of its task.

    Preprocessing is what the checkpoint says: images are resized to ``image_size`` (square, the
    training size) when the checkpoint records one (a classifier with ``eval_crop``: the shorter side
    resized, then the centre square, :func:`components.stages.pretrain.classification_eval_transform`), and normalised with ``mean``/``std`` when it
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
        crop = ckpt.get("eval_crop")
        self.eval_crop: float | None = float(crop) if crop is not None and self.task == "classification" else None
        self._eval_transform: Any = None
        if self.eval_crop is not None and self.image_size is not None:
            from components.stages.pretrain import classification_eval_transform

            self._eval_transform = classification_eval_transform(self.image_size, self.eval_crop)
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
        if self._eval_transform is not None:
            x = self._eval_transform(image)
        else:
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
        record: dict[str, Any] = {  # full precision: COCO AP ranks detections by score
            "boxes": boxes.tolist(),
            "labels": [self._label(int(c)) for c in det["labels"].cpu()[keep]],
            "scores": det["scores"].float().cpu()[keep].tolist(),
        }
        if "masks" in det:
            from components.data.canonical import encode_rle

            masks = det["masks"].float().cpu()[keep]  # [N, 1, h', w'] probabilities
            if len(masks):
                masks = torch.nn.functional.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)
            record["masks"] = [encode_rle((m[0] >= self.mask_threshold).numpy()) for m in masks]
        return record


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ImageFile:
    """One input image: its path and its name in the outputs.

    Attributes:
        path: the file as found (relative or absolute, as given).
        name: its path relative to the common folder of all inputs (POSIX separators): unique
            among the inputs, the key of its predictions, its COCO ``file_name`` and its mask's name.
    """

    path: Path
    name: str


def _has_glob_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _walk_folder(folder: Path) -> list[Path]:
    """Image files under ``folder`` at any depth (suffix in :data:`IMAGE_EXTENSIONS`, any case), sorted by relative path."""
    found = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _expand_path(path: Path) -> tuple[list[Path], str] | None:
    """The images of an existing folder (walked) or file, and the folder their names start from; None when neither."""
    if path.is_dir():
        return _walk_folder(path), os.path.abspath(path)
    if path.is_file():
        return [path], os.path.dirname(os.path.abspath(path))
    return None


def collect_images(inputs: Sequence[str | Path]) -> list[ImageFile]:
    """The image files named by ``inputs``: files, folders (walked recursively) and glob patterns.

    Files named directly are always tried (a non-image among them becomes a per-image error);
    folders contribute the files whose suffix is an image extension (case-insensitive); a glob
    (``"shots/**/*.jpg"``, recursive ``**`` allowed) contributes the image files it matches, and
    walks the folders it matches. Order: the inputs' order, each input's files sorted by relative path;
    a file reached twice is kept once. Names are paths relative to the deepest folder holding
    every input, so ``a.jpg`` and ``a.png``, or ``x/a.png`` and ``y/a.png``, never share a name.

    Raises:
        DataError: an input is neither a file, a folder nor a glob with matches, or no image is found.
    """
    paths: list[Path] = []
    anchors: list[str] = []
    for item in inputs:
        text = str(item)
        found = _expand_path(Path(text))
        if found is not None:
            expanded = [found]
        elif _has_glob_magic(text):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            images = [m for m in matches if m.is_dir() or m.suffix.lower() in IMAGE_EXTENSIONS]
            expanded = [f for m in images if (f := _expand_path(m)) is not None]
            if not expanded:
                raise DataError("the glob matches no image file", file=text, fix="check the pattern (quote it so that the shell leaves it alone)")
        else:
            raise DataError("no such file or folder", file=text, fix="give image files, folders or glob patterns")
        for files, anchor in expanded:
            paths.extend(files)
            anchors.append(anchor)
    seen: set[str] = set()
    unique: list[Path] = []
    for path in paths:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    if not unique:
        raise DataError(
            f"no image files (suffixes {', '.join(sorted(IMAGE_EXTENSIONS))}, any case)",
            file=", ".join(map(str, inputs)), fix="give image files or folders that hold some",
        )
    base = os.path.commonpath(anchors)
    return [ImageFile(path, Path(os.path.relpath(os.path.abspath(path), base)).as_posix()) for path in unique]


@dataclass
class DecodedImage:
    """An input decoded for the model.

    Attributes:
        array: ``uint8[h, w, 3]`` RGB, at most :data:`MAX_SIDE` pixels on a side.
        size: ``(height, width)`` of the original image: the frame of the written outputs.
        notes: the conversions done (grey -> RGB, alpha, 16 bits, shrinking), for the report.
    """

    array: np.ndarray
    size: tuple[int, int]
    notes: list[str] = field(default_factory=list)


def read_image_file(path: Path) -> DecodedImage:
    """Decode one file with the conversions of the module docstring; shrink it when over :data:`MAX_SIDE`.

    Raises:
        DataError: naming the file: missing, not an image, truncated/corrupt, or too large to decode.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"cannot read the file ({err.strerror or err})", file=path, fix="check that it exists and is readable") from None
    try:
        array, notes = open_image_bytes(data)
    except DataError as err:
        raise DataError(err.message, file=path, fix=err.fix) from None
    h, w = array.shape[:2]
    if max(h, w) > MAX_SIDE:
        scale = MAX_SIDE / max(h, w)
        small = (max(1, round(w * scale)), max(1, round(h * scale)))
        array = np.asarray(Image.fromarray(array).resize(small, Image.Resampling.BILINEAR))
        notes.append(f"{w}x{h} shrunk to {small[0]}x{small[1]} before the model (outputs in the original's pixels)")
    return DecodedImage(array, (h, w), notes)


def rescale_record(record: dict[str, Any], from_size: tuple[int, int], to_size: tuple[int, int]) -> dict[str, Any]:
    """A prediction made on an image of ``from_size`` (h, w), in the pixels of ``to_size``: boxes scaled, masks resized (nearest)."""
    if from_size == to_size:
        return record
    (fh, fw), (th, tw) = from_size, to_size
    out = dict(record)
    if "boxes" in record:
        sx, sy = tw / fw, th / fh
        out["boxes"] = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in record["boxes"]]
    if "mask" in record:
        mask = Image.fromarray(np.asarray(record["mask"], dtype=np.uint8))
        out["mask"] = np.asarray(mask.resize((tw, th), Image.Resampling.NEAREST)).tolist()
    if record.get("masks"):
        from pycocotools import mask as mask_utils

        from components.data.canonical import encode_rle

        resized = []
        for rle in record["masks"]:
            binary = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
            big = Image.fromarray(binary * np.uint8(255)).resize((tw, th), Image.Resampling.NEAREST)
            resized.append(encode_rle(np.asarray(big) > 0))
        out["masks"] = resized
    return out


# --------------------------------------------------------------------------- models


class Predictor(Protocol):
    """What ``visionflow predict`` runs: an :class:`ImagePredictor`, a registry model or an ONNX file."""

    task: str
    categories: list[str]

    def predict(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """``uint8[H, W, 3]`` RGB images -> one record per image (the keys of :class:`ImagePredictor`)."""
        ...


class PyfuncPredictor:
    """A registered model (``models:/NAME@ALIAS``, ``runs:/ID/model``) called through its pyfunc ``predict``.

    The task and class names are those of the :class:`ImagePredictor` inside the visionflow pyfunc.

    Raises:
        TrackingError: the URI does not resolve. CheckpointError: the model is not a visionflow pyfunc.
    """

    def __init__(self, model_uri: str):
        from components.tracking import load_pyfunc

        self.model_uri = model_uri
        self.pyfunc = load_pyfunc(model_uri)
        inner = getattr(self.pyfunc.unwrap_python_model(), "predictor", None)
        if inner is None:
            raise CheckpointError("not a visionflow model (its python model has no predictor)", file=model_uri,
                                  fix="give a model registered by `visionflow register`, or a checkpoint path")
        self.task: str = inner.task
        self.categories: list[str] = list(inner.categories)
        self.instance = inner.task == "segmentation" and inner._is_instance_model()

    def predict(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        import pandas as pd

        frame = self.pyfunc.predict(pd.DataFrame({"image": list(images)}))
        return frame.to_dict(orient="records")


def load_predictor(model: str, *, device: str = "auto") -> Predictor:
    """The predictor of ``--model``: a registry URI, an ``.onnx`` file or a checkpoint path.

    Raises:
        CheckpointError: the checkpoint or ONNX file is missing or unusable.
        TrackingError: the registry URI does not resolve.
    """
    if "://" in model or model.startswith(("models:/", "runs:/")):
        return PyfuncPredictor(model)
    if Path(model).suffix.lower() == ".onnx":
        if not Path(model).is_file():
            raise CheckpointError("ONNX file not found", file=model, fix="run `visionflow export --model ... --format onnx` first")
        try:
            from components.export.onnx_runtime import OnnxPredictor
        except ImportError as err:
            raise CheckpointError(f"cannot run ONNX files here ({err})", file=model, fix="pip install onnxruntime") from None
        try:
            onnx = OnnxPredictor(model)
        except ValueError as err:  # the torch-free module reports with ValueError, its message names the file
            raise CheckpointError(str(err), fix="export it with `visionflow export`") from None
        return ProposalOnnxPredictor(onnx) if onnx.needs_proposals else onnx
    return ImagePredictor.from_checkpoint(model, device=device)


class ProposalOnnxPredictor:
    """An R-CNN / Fast R-CNN ONNX graph with its selective search run beside it, as the pyfunc runs it.

    The graph takes each image's proposals as a second input (selective search is not a graph);
    :func:`components.export.onnx_export.selective_search_proposals` computes them with the
    parameters stored in the graph's metadata. Every other attribute is the wrapped predictor's.
    """

    def __init__(self, onnx: Any) -> None:
        self.onnx = onnx

    def __getattr__(self, name: str) -> Any:
        return getattr(self.onnx, name)

    def predict(self, images: list[Any]) -> list[dict[str, Any]]:
        from components.export.onnx_export import selective_search_proposals

        return self.onnx.predict(images, proposals=selective_search_proposals(self.onnx.meta, images))


def _is_instance(predictor: Predictor) -> bool:
    """The predictor's records carry instance masks (``masks``, RLE) rather than a class-index ``mask``."""
    if isinstance(predictor, ImagePredictor):
        return predictor.task == "segmentation" and predictor._is_instance_model()
    if isinstance(predictor, PyfuncPredictor):
        return predictor.instance
    return predictor.task == "segmentation" and getattr(predictor, "postprocess", "") == "in_graph"


# --------------------------------------------------------------------------- COCO ids


def coco_ids(
    files: Sequence[ImageFile], categories: Sequence[str], coco: Path | None
) -> tuple[dict[str, int], dict[str, int]]:
    """Image ids (by :attr:`ImageFile.name`) and category ids (by name) of the COCO results.

    Without ``coco``: images 1..N in input order, categories 1..K in the model's order. With a
    COCO instances file: its own ids; an image matches the ``file_name`` equal to its name, else
    the one with its base name when only one has it; a category matches by name.

    Raises:
        DataError: the file is unreadable, an input image or a model category is not in it (named,
            with the file), a file name is ambiguous, or two inputs match the same image.
    """
    if coco is None:
        return {f.name: i for i, f in enumerate(files, start=1)}, {c: k for k, c in enumerate(categories, start=1)}
    from components.io import read_json

    try:
        data = read_json(coco)
        images = {str(im["file_name"]): int(im["id"]) for im in data["images"]}
        cats = {str(c["name"]): int(c["id"]) for c in data["categories"]}
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the COCO file ({err})", file=coco, fix="give a COCO instances JSON") from None
    except (KeyError, TypeError) as err:
        raise DataError(f"not a COCO instances file: images need file_name and id, categories name and id ({err!r} missing)",
                        file=coco, record="images/categories", fix="give a COCO instances JSON (the ingest stage's annotations/instances_<split>.json)") from None
    by_base: dict[str, list[str]] = {}
    for name in images:
        by_base.setdefault(Path(name).name, []).append(name)
    image_ids: dict[str, int] = {}
    owner: dict[int, str] = {}
    for f in files:
        base = Path(f.name).name
        if f.name in images:
            key = f.name
        elif len(by_base.get(base, [])) == 1:
            key = by_base[base][0]
        elif base in by_base:
            raise DataError(f"{len(by_base[base])} images of {coco} are named {base!r}: which one is {f.path} is ambiguous",
                            file=f.path, record=f"file_name {base}", fix="pass the folder the COCO file_name paths are relative to")
        else:
            raise DataError(f"not among the images of {coco}", file=f.path, record=f"file_name {f.name}",
                            fix="predict the images that file lists, or leave out --coco (ids then count from 1)")
        image_id = images[key]
        if image_id in owner:
            raise DataError(f"matches image id {image_id} ({key!r}) of {coco}, as {owner[image_id]} does", file=f.path,
                            record=f"image_id {image_id}", fix="give each image once (one folder, not copies)")
        owner[image_id] = str(f.path)
        image_ids[f.name] = image_id
    missing = [c for c in categories if c not in cats]
    if missing:
        raise DataError(f"the model's categories {missing} are not among its categories {sorted(cats)}", file=coco,
                        record="categories", fix="use the instances file of the dataset the model was trained on")
    return image_ids, {c: cats[c] for c in categories}


def coco_results(
    predictions: Mapping[str, dict[str, Any]], image_ids: Mapping[str, int], category_ids: Mapping[str, int]
) -> list[dict[str, Any]]:
    """COCO results ``[{image_id, category_id, bbox [x, y, w, h], score, [segmentation RLE]}]`` of detection records.

    ``w = x2 - x1`` in float64, as the evaluator converts; images in id order, detections in the
    model's order.

    Raises:
        DataError: a label is not a category of ``category_ids``.
    """
    results = []
    for name in sorted(predictions, key=lambda n: image_ids[n]):
        rec = predictions[name]
        masks = rec.get("masks")
        for j, (box, label, score) in enumerate(zip(rec["boxes"], rec["labels"], rec["scores"], strict=True)):
            if label not in category_ids:
                raise DataError(f"predicted label {label!r} is not a category", record=name, fix="the model's categories and the COCO file's must match")
            x1, y1, x2, y2 = (float(v) for v in box)
            row: dict[str, Any] = {"image_id": image_ids[name], "category_id": category_ids[label], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)}
            if masks is not None:
                row["segmentation"] = masks[j]
            results.append(row)
    return results


# --------------------------------------------------------------------------- the command


class PartialPredictionError(DataError):
    """Some images could not be predicted; the others were (exit code 1: the run is incomplete, not broken)."""

    exit_code = 1


@dataclass
class PredictionRun:
    """What ``visionflow predict`` did.

    Attributes:
        predictions: record per predicted image name, in the original image's pixels.
        failed: ``{name: error line}`` of the images that could not be predicted.
        notes: ``{name: [conversions]}`` of the images converted before the model.
        sizes: ``(height, width)`` per predicted image.
    """

    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)


def _batches(items: Sequence[ImageFile], size: int) -> Iterator[Sequence[ImageFile]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _predict_batch(predictor: Predictor, batch: list[tuple[ImageFile, DecodedImage]], run: PredictionRun) -> None:
    """Predict a batch; when it fails, each image alone, so that one bad image never costs the others."""
    try:
        records = predictor.predict([d.array for _, d in batch])
    except (DataError, RuntimeError, ValueError) as err:
        if len(batch) > 1:
            for item in batch:
                _predict_batch(predictor, [item], run)
            return
        f, _ = batch[0]
        message = err.message if isinstance(err, DataError) else str(err).splitlines()[0] if str(err) else type(err).__name__
        run.failed[f.name] = str(DataError(f"the model failed on this image: {message}", file=f.path,
                                           fix="check the image (size, content); the other images were predicted"))
        return
    for (f, decoded), record in zip(batch, records, strict=True):
        run.predictions[f.name] = rescale_record(record, tuple(decoded.array.shape[:2]), decoded.size)
        run.sizes[f.name] = decoded.size
        if decoded.notes:
            run.notes[f.name] = decoded.notes


def predict_images(predictor: Predictor, files: Sequence[ImageFile], *, batch_size: int = DEFAULT_BATCH_SIZE) -> PredictionRun:
    """Decode and predict every file, ``batch_size`` images per forward pass, with a progress bar.

    An image that cannot be decoded or predicted is reported on stderr (file, what, fix) and
    recorded in ``failed``; the others are predicted.
    """
    from tqdm.auto import tqdm

    from components.engine import progress

    run = PredictionRun()
    bar = progress(total=len(files), desc="predict", unit="img")
    try:
        for chunk in _batches(files, max(1, batch_size)):
            batch = []
            for f in chunk:
                try:
                    batch.append((f, read_image_file(f.path)))
                except DataError as err:
                    run.failed[f.name] = str(err)
            if batch:
                _predict_batch(predictor, batch, run)
            for f in chunk:
                if f.name in run.failed:
                    tqdm.write(f"visionflow predict: skipped: {run.failed[f.name]}", file=sys.stderr)
            bar.update(len(chunk))
    finally:
        bar.close()
    return run


def _write_png(mask: np.ndarray, path: Path) -> Path:
    """:func:`components.data.canonical.write_png`'s encoding, written atomically (a killed predict leaves no half PNG)."""
    from components.data.canonical import PNG_OPTIONS

    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, **PNG_OPTIONS)
    return atomic_write_bytes(path, buf.getvalue())


def masks_folder(out: Path) -> Path:
    """Where semantic masks go for ``--out OUT.json``: the folder ``OUT_masks`` beside it."""
    return out.with_name(f"{out.stem}_masks")


def predict_files(
    model: str,
    inputs: Sequence[str | Path],
    *,
    out: Path | None = None,
    coco: Path | None = None,
    draw: Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    threads: int | None = DEFAULT_THREADS,
) -> dict[str, Any]:
    """Run a registered model, an ONNX file or a checkpoint on image files, folders and globs.

    Args:
        model: ``models:/NAME@ALIAS``, ``runs:/ID/model``, ``PATH.onnx`` (``visionflow export``) or a
            stage checkpoint (``outputs/detect/yolo/best.pt``).
        inputs: image files, folders (walked recursively) and glob patterns (:func:`collect_images`).
        out: what to write (atomically), by task:

            * detection and instance segmentation: COCO results JSON ``[{image_id, category_id, bbox
              [x, y, w, h], score}]`` (instance models add ``segmentation``, compressed RLE), the
              input of ``visionflow evaluate --pred`` as is; beside it ``OUT.images.json`` lists the
              ids: ``{images: [{id, file_name, path, height, width}], categories: [{id, name}], failed}``;
            * semantic segmentation: one PNG per image in ``OUT_masks/`` named ``<name>.png`` (the
              input's relative path with its suffix kept: ``a.jpg`` -> ``a.jpg.png``), pixel = class
              index (0 background, k category k); ``OUT`` indexes them with the categories;
            * classification and backbone: ``{model, task, categories, predictions: {name: record}, failed}``.
        coco: a COCO instances file whose image and category ids the results use (detectors only).
        draw: write each image with its predictions drawn into this folder (``<name>.png``).
        batch_size: images per forward pass (:data:`DEFAULT_BATCH_SIZE`).
        device: ``auto``, ``cpu`` or ``cuda`` (checkpoints; a registry model uses its own config).
        threads: torch's CPU threads while predicting (:data:`DEFAULT_THREADS`, the stages' own);
            None leaves torch's default (faster on an idle many-core machine, scores may then differ
            from the stage's in the last bits).

    Returns:
        ``{model, task, images, predicted, failed: {name: error}, converted: {name: notes}, out, ...,
        predictions: {name: record}}``.

    Raises:
        DataError: an input is not found, or the COCO file does not list an input or a category
            (before any prediction). ConfigError: ``--coco`` with a model that is not a detector.
        CheckpointError / TrackingError: the model cannot be loaded.
    """
    files = collect_images(inputs)
    predictor = load_predictor(model, device=device)
    instance = _is_instance(predictor)
    boxes = predictor.task == "detection" or instance
    if coco is not None and not boxes:
        raise ConfigError(f"--coco applies to detectors and instance segmenters, not to a {predictor.task} model",
                          record="--coco", fix="leave out --coco")
    image_ids, category_ids = coco_ids(files, predictor.categories, Path(coco) if coco else None) if boxes else ({}, {})
    from components.engine import torch_threads

    with torch_threads(threads):
        run = predict_images(predictor, files, batch_size=batch_size)
    result: dict[str, Any] = {
        "model": model, "task": predictor.task, "images": len(files), "predicted": len(run.predictions),
        "failed": run.failed, "converted": run.notes,
    }
    if out is not None:
        out = Path(out)
        if boxes:
            write_json(coco_results(run.predictions, image_ids, category_ids), out, indent=None)
            index = {
                "model": model,
                "images": [{"id": image_ids[f.name], "file_name": f.name, "path": str(f.path), "height": run.sizes[f.name][0],
                            "width": run.sizes[f.name][1]} for f in files if f.name in run.predictions],
                "categories": [{"id": i, "name": n} for n, i in category_ids.items()],
                "failed": run.failed,
            }
            result["index"] = str(write_json(index, out.with_name(f"{out.stem}.images.json")))
        elif predictor.task == "segmentation":
            folder = masks_folder(out)
            written = {name: str(_write_png(np.asarray(rec["mask"], dtype=np.uint8), folder / f"{name}.png"))
                       for name, rec in run.predictions.items()}
            write_json({"model": model, "task": predictor.task, "categories": ["background", *predictor.categories],
                        "masks": written, "failed": run.failed}, out)
            result["masks"] = str(folder)
        else:
            write_json({"model": model, "task": predictor.task, "categories": predictor.categories,
                        "predictions": run.predictions, "failed": run.failed}, out)
        result["out"] = str(out)
    if draw is not None:
        done = [f for f in files if f.name in run.predictions]
        result["drawn"] = [str(p) for p in draw_predictions(done, [run.predictions[f.name] for f in done], Path(draw))]
    result["predictions"] = run.predictions
    return result


def draw_predictions(images: Sequence[ImageFile], records: Sequence[dict[str, Any]], folder: Path, *, min_score: float = 0.25) -> list[Path]:
    """Draw each record on its image (boxes with ``label score``, masks, or the class label) as ``folder/<name>.png``.

    Only detections scoring at least ``min_score`` are drawn (the JSON output keeps them all).
    """
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    written = []
    for item, rec in zip(images, records, strict=True):
        array, _ = open_image_bytes(Path(item.path).read_bytes(), record=item.path)
        img = torch.from_numpy(array.copy()).permute(2, 0, 1)
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
        written.append(_write_png(img.permute(1, 2, 0).numpy(), folder / f"{item.name}.png"))
    return written
