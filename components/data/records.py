"""The format-neutral records every source reader produces and the canonical writer consumes.

A reader (COCO, VOC, YOLO, ImageFolder, masks, shapes) only *parses*: it turns its format into
:class:`SourceDataset` of :class:`ImageRecord` / :class:`ObjectRecord`, keeping values as the
source gave them (a box may still be outside the image). Validation, repair and writing happen
once, in :mod:`components.data.canonical`, for every format alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

Task = Literal["classification", "detection", "instance_segmentation", "semantic_segmentation"]
SPLITS = ("train", "val", "test")


@dataclass
class ObjectRecord:
    """One annotated object as the source gave it.

    Attributes:
        category: category name (must be one of the dataset's categories).
        box: ``(x_min, y_min, x_max, y_max)`` pixels, or None when it is derived from ``mask``.
        record: the source's id of this object, for the report (e.g. ``"annotation 17"``).
        polygons: COCO polygons ``[[x1, y1, ...], ...]``.
        rle: COCO RLE ``{"size": [H, W], "counts": ...}``.
        mask: ``bool[H, W]`` instance mask (the visible pixels).
        difficult: VOC's difficult flag (0/1), kept as the extra key ``"difficult"``.
        iscrowd: COCO's crowd flag.
    """

    category: str
    box: tuple[float, ...] | list[Any] | None
    record: str
    polygons: Any = None
    rle: dict[str, Any] | None = None
    mask: np.ndarray | None = None
    difficult: int = 0
    iscrowd: int = 0


@dataclass
class ImageRecord:
    """One image (and its labels) as the source gave it.

    Attributes:
        record: the source's id of the image, for the report.
        name: file name to use under ``images/<split>/`` (unique within its split).
        file: source image file, copied byte for byte; None for generated images.
        pixels: ``uint8[H, W, 3]`` for generated images (encoded as PNG).
        ann_file: the annotation file this record came from, for the report.
        split: ``train``/``val``/``test`` when the source says, else None (seeded split).
        key: the image's path relative to the source root (POSIX), the stable key of the seeded
            split: the same image gets the same split however many images are added around it.
        size: ``(width, height)`` the annotation declares, checked against the decoded image.
        objects: annotated objects (detection, instance segmentation).
        label: class name for classification sources, the category of a mask-labelled source's masks.
        mask_file: label image: per-instance ids (``mask_kind="instance"``) or binary (``"binary"``).
        semantic: ``uint8[H, W]`` semantic mask for generated images (0 background, k, 255 ignore).
    """

    record: str
    name: str
    file: Path | None = None
    pixels: np.ndarray | None = None
    ann_file: Path | None = None
    split: str | None = None
    key: str | None = None
    size: tuple[int, int] | None = None
    objects: list[ObjectRecord] = field(default_factory=list)
    label: str | None = None
    mask_file: Path | None = None
    mask_kind: Literal["instance", "binary"] | None = None
    semantic: np.ndarray | None = None


@dataclass
class SourceDataset:
    """A parsed source: its categories (id order 1..K), the views it supports, and its records.

    Attributes:
        name: dataset name for the manifest.
        spec: the ``--source`` spec it came from.
        categories: category names; category id k is ``categories[k - 1]``.
        tasks: views to write (see ``dataset.json["tasks"]``).
        records: every image record, in a deterministic order.
        binary_foreground: for binary masks, the pixel rule of category 1 (``"dark"``: value < 128).
        crop_size: side of the classification crops; None keeps each crop at its native size.
        classes_from_params: ``categories`` is ``data.classes`` (an unknown category's fix names that key).
    """

    name: str
    spec: str
    categories: list[str]
    tasks: list[Task]
    records: list[ImageRecord]
    binary_foreground: Literal["dark", "bright"] = "bright"
    crop_size: int | None = None
    classes_from_params: bool = False


def relative_key(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as a POSIX string (the stable key of an image); its name if outside."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


#: file suffixes a source reader treats as images (the canonical writer then checks the bytes)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def natural_key(path: Path | str) -> tuple[Any, ...]:
    """Sort key that orders ``img2`` before ``img10`` (a stable, human reading order)."""
    name = path.name if isinstance(path, Path) else path
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name))


def list_images(folder: Path) -> list[Path]:
    """Image-like files directly in ``folder`` (hidden files ignored), in natural order."""
    return sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        ),
        key=natural_key,
    )


def category_folder(name: str) -> str:
    """The folder name of a category in the ImageFolder view: a category name from an (untrusted)
    annotation file never becomes a path (``"a/b"`` -> ``"a_b"``, ``".."`` -> ``"_.."``)."""
    safe = name.replace("/", "_").replace("\\", "_")
    return f"_{safe}" if safe in ("", ".", "..") else safe
