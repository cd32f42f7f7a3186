"""Mask-labelled sources: images + one label PNG per image.

Two layouts are recognised by their folder names:

* **per-instance** (Penn-Fudan: ``PNGImages/`` + ``PedMasks/<stem>_mask.png``): every non-zero
  value of the label image is one instance (0 = background); boxes come from the masks. One
  category, ``pedestrian`` for Penn-Fudan (``data.masks_category`` names it otherwise).
* **binary** (``image/`` + ``label/``, or ``images/`` + ``masks/``/``labels/``): one category,
  semantic segmentation only. In the ISBI 2012 / UNet-paper membrane layout (``image/`` +
  ``label/``) label value 0 is membrane and 255 is cell, so by default category 1 = ``membrane``
  is the *dark* pixels (< 128) and everything else (the cells) is background 0; other binary
  layouts default to the bright pixels (``data.masks_foreground`` overrides either way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from components.data.records import ImageRecord, SourceDataset, list_images, relative_key
from components.data.validation import IngestReport
from components.errors import DataError

INSTANCE_LAYOUTS = (("PNGImages", "PedMasks"),)
BINARY_LAYOUTS = (("image", "label"), ("images", "masks"), ("images", "labels"), ("images", "label"))


def _find_mask(mask_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}.png", f"{stem}_mask.png", f"{stem}_label.png"):
        if (mask_dir / name).is_file():
            return mask_dir / name
    return None


def read_masks(
    root: Path,
    report: IngestReport,
    *,
    category: str | None = None,
    foreground: Literal["auto", "dark", "bright"] = "auto",
) -> SourceDataset:
    """Parse a mask-labelled folder into records (masks are read by the canonical writer)."""
    layout = next(
        ((i, m, "instance") for i, m in INSTANCE_LAYOUTS if (root / i).is_dir() and (root / m).is_dir()), None
    )
    layout = layout or next(
        ((i, m, "binary") for i, m in BINARY_LAYOUTS if (root / i).is_dir() and (root / m).is_dir()), None
    )
    if layout is None:
        known = [f"{i}/ + {m}/" for i, m in INSTANCE_LAYOUTS + BINARY_LAYOUTS]
        raise DataError(
            "no known images + masks layout", file=root, fix=f"lay the folder out as one of {known}"
        )
    image_dir, mask_dir, kind = layout
    isbi = (image_dir, mask_dir) == ("image", "label")
    if category is None:
        category = "pedestrian" if mask_dir == "PedMasks" else "membrane" if isbi else "object"
    rule: Literal["dark", "bright"] = ("dark" if isbi else "bright") if foreground == "auto" else foreground
    records: list[ImageRecord] = []
    for image in list_images(root / image_dir):
        mask = _find_mask(root / mask_dir, image.stem)
        if mask is None:
            report.add(
                image,
                image.stem,
                f"no mask in {mask_dir}/ for this image",
                "skipped",
                kind="image without mask",
                fix=f"add {mask_dir}/{image.stem}.png",
            )
            continue
        records.append(
            ImageRecord(
                record=image.stem,
                name=image.name,
                file=image,
                ann_file=mask,
                key=relative_key(image, root),
                label=category,
                mask_file=mask,
                mask_kind=kind,  # type: ignore[arg-type]
            )
        )
    if not records:
        raise DataError("no image with a mask found", file=root, fix=f"put label PNGs in {mask_dir}/")
    tasks = (
        ["classification", "detection", "instance_segmentation", "semantic_segmentation"]
        if kind == "instance"
        else ["semantic_segmentation"]
    )
    return SourceDataset(
        name=root.name.lower(),
        spec=f"masks:{root}",
        categories=[category],
        tasks=tasks,  # type: ignore[arg-type]
        records=records,
        binary_foreground=rule,
    )
