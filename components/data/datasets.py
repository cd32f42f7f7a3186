"""torch Datasets over the canonical layout (see docs/architecture.md), returning tv_tensors.

Images are decoded with PIL (RGB, float in [0, 1]); annotations are read once and
indexed in memory, so ``__getitem__`` only decodes pixels (and RLE masks when asked for). Targets
are tv_tensors (``BoundingBoxes`` XYXY, ``Mask``) so a ``transforms.v2`` pipeline moves image,
boxes, masks and labels together.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from components.data.canonical import decode_segmentation
from components.data.records import category_folder, natural_key
from components.data.validation import load_json
from components.errors import DataError
from components.io import read_json

Transform = Callable[..., Any]


def load_manifest(root: str | Path) -> dict[str, Any]:
    """Read ``DIR/dataset.json``.

    Raises:
        DataError: the folder is not a canonical dataset (no or unreadable manifest).
    """
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DataError(
            "no dataset.json: not a canonical dataset folder",
            file=Path(root),
            fix="run `visionflow ingest --source SPEC --out DIR` first",
        )
    manifest = load_json(path, fix="re-run the ingest stage")
    for key in ("tasks", "categories", "splits"):
        if key not in manifest:
            raise DataError(f"manifest has no {key!r}", file=path, fix="re-run the ingest stage")
    return manifest


def require_splits(manifest: dict[str, Any], manifest_path: Path, splits: tuple[str, ...] = ("train", "val", "test")) -> None:
    """Raise :class:`DataError` unless every split in ``splits`` has images (training stages need all three)."""
    present = manifest.get("splits", {})
    for split in splits:
        if not present.get(split):
            raise DataError(
                f"the dataset has no {split!r} images (splits: {present})",
                file=manifest_path,
                record="splits",
                fix="ingest with a non-empty train/val/test split",
            )


def _require(manifest: dict[str, Any], root: Path, task: str, split: str) -> None:
    if task not in manifest["tasks"]:
        raise DataError(
            f"the dataset has no {task} view (it has {manifest['tasks']})",
            file=root,
            fix="ingest a source with that kind of labels",
        )
    if split not in manifest["splits"]:
        raise DataError(
            f"no split {split!r} (splits: {list(manifest['splits'])})",
            file=root,
            record=split,
            fix="use one of the splits listed in dataset.json",
        )


def read_image(path: Path) -> tv_tensors.Image:
    """Decode an image file (PIL) to ``tv_tensors.Image`` float32 ``[3, H, W]`` in [0, 1]; grey images become RGB."""
    try:
        with Image.open(path) as img:
            data = F.pil_to_tensor(img.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot decode image: {err}", file=path, fix="re-run the ingest stage") from None
    return tv_tensors.Image(F.to_dtype(data, torch.float32, scale=True))


def read_mask(path: Path) -> torch.Tensor:
    """Decode a class-index PNG to ``int64[H, W]``."""
    try:
        with Image.open(path) as img:
            return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).to(torch.int64)
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot decode mask: {err}", file=path, fix="re-run the ingest stage") from None


def _load_instances(root: Path, split: str) -> dict[str, Any]:
    path = root / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise DataError("annotation file missing", file=path, fix="re-run the ingest stage")
    return read_json(path)


class ClassificationDataset(Dataset):
    """The ImageFolder view ``classification/<split>/<class>/<file>``.

    Args:
        root: canonical dataset folder.
        split: ``train``, ``val`` or ``test``.
        transform: applied to the ``tv_tensors.Image`` (e.g. ``build_transforms("classification", ...)``).

    Returns (per item):
        ``(Tensor[3, H, W] float in [0, 1], int label 0..K-1)``; ``label = category id - 1``.
    """

    def __init__(self, root: str | Path, split: str, transform: Transform | None = None):
        self.root = Path(root)
        manifest = load_manifest(self.root)
        _require(manifest, self.root, "classification", split)
        self.classes: list[str] = list(manifest["categories"])
        self.split = split
        self.transform = transform
        folder = self.root / "classification" / split
        self.samples: list[tuple[Path, int]] = []
        for index, name in enumerate(self.classes):
            class_dir = folder / category_folder(name)
            if class_dir.is_dir():
                self.samples += [
                    (p, index) for p in sorted(class_dir.iterdir(), key=natural_key) if p.is_file()
                ]
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = read_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


class DetectionDataset(Dataset):
    """Images with boxes (and instance masks) from ``annotations/instances_<split>.json``.

    Args:
        root: canonical dataset folder.
        split: ``train``, ``val`` or ``test``.
        transforms: called as ``transforms(image, target)`` (a ``transforms.v2`` pipeline).
        masks: also return the instance masks (needs the ``instance_segmentation`` view).

    Returns (per item):
        ``(tv_tensors.Image float[3, H, W] in [0, 1], target)`` with target ``{"boxes": BoundingBoxes
        XYXY float[N, 4] pixels, "labels": int64[N] in 1..K, "image_id": int, "area": float[N],
        "iscrowd": int64[N]}`` and, with ``masks=True``, ``"masks": Mask uint8[N, H, W]``.
    """

    def __init__(
        self, root: str | Path, split: str, transforms: Transform | None = None, masks: bool = False
    ):
        self.root = Path(root)
        manifest = load_manifest(self.root)
        _require(manifest, self.root, "detection", split)
        if masks and "instance_segmentation" not in manifest["tasks"]:
            raise DataError(
                "masks=True but the dataset has no instance masks",
                file=self.root,
                fix="use masks=False or a source with masks",
            )
        self.classes: list[str] = list(manifest["categories"])
        self.split = split
        self.transforms = transforms
        self.masks = masks
        coco = _load_instances(self.root, split)
        self.images: list[dict[str, Any]] = sorted(coco["images"], key=lambda im: im["id"])
        by_image: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in self.images}
        for ann in coco["annotations"]:
            by_image[ann["image_id"]].append(ann)
        self._annotations = [by_image[im["id"]] for im in self.images]
        self._boxes = [
            torch.tensor(
                [
                    [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                    for a in anns
                ],
                dtype=torch.float32,
            ).reshape(-1, 4)
            for anns in self._annotations
        ]

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.root / "images" / self.split / self.images[index]["file_name"]

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        info, anns = self.images[index], self._annotations[index]
        image = read_image(self.image_path(index))
        height, width = image.shape[-2:]
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                self._boxes[index].clone(), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "image_id": int(info["id"]),
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.int64),
        }
        if self.masks:
            stack = [decode_segmentation(a["segmentation"], height, width) for a in anns]
            array = np.stack(stack) if stack else np.zeros((0, height, width), dtype=bool)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(array.astype(np.uint8)))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class SegmentationDataset(Dataset):
    """Images with semantic masks ``masks/<split>/<stem>.png``.

    Args:
        root: canonical dataset folder.
        split: ``train``, ``val`` or ``test``.
        transforms: called as ``transforms(image, mask)``.

    Returns (per item):
        ``(tv_tensors.Image float[3, H, W], tv_tensors.Mask int64[H, W])`` with 0 = background,
        k = category id, 255 = ignore.
    """

    def __init__(self, root: str | Path, split: str, transforms: Transform | None = None):
        self.root = Path(root)
        manifest = load_manifest(self.root)
        _require(manifest, self.root, "semantic_segmentation", split)
        self.classes: list[str] = list(manifest["categories"])
        self.ignore_index = int(manifest.get("ignore_index", 255))
        self.split = split
        self.transforms = transforms
        coco = _load_instances(self.root, split)
        self.files = [im["file_name"] for im in sorted(coco["images"], key=lambda im: im["id"])]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        name = self.files[index]
        image = read_image(self.root / "images" / self.split / name)
        mask_path = self.root / "masks" / self.split / f"{Path(name).stem}.png"
        target = tv_tensors.Mask(read_mask(mask_path))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def detection_collate(
    batch: list[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Batch detection samples as ``(list[Tensor[3, H, W]], list[target])``: sizes and box counts differ."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)
