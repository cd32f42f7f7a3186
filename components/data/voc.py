"""Pascal VOC reader: ``Annotations/*.xml`` + ``JPEGImages/`` (or ``annotations/`` + ``images/``).

Splits come from ``ImageSets/Main/{train,val,test}.txt`` when present (``trainval.txt`` stands
for ``train`` when there is no ``train.txt``); otherwise the canonical writer draws a seeded one
from each image's path relative to the VOC folder (stable as the folder grows).
Boxes are kept in VOC's pixel coordinates, ``difficult`` is kept as the extra annotation key.
Categories are the object names found, sorted, so the id order is stable.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from components.data.records import (
    IMAGE_SUFFIXES,
    ImageRecord,
    ObjectRecord,
    SourceDataset,
    natural_key,
    relative_key,
)
from components.data.validation import IngestReport
from components.errors import DataError


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def read_split_lists(root: Path) -> dict[str, str]:
    """``{image id: split}`` from ``ImageSets/Main/*.txt`` (empty when the source has none)."""
    main = root / "ImageSets" / "Main"
    lists = {s: main / f"{s}.txt" for s in ("train", "val", "test", "trainval")}
    if not any(p.is_file() for p in lists.values()):
        return {}
    use = {
        "train": lists["train"] if lists["train"].is_file() else lists["trainval"],
        "val": lists["val"],
        "test": lists["test"],
    }
    splits: dict[str, str] = {}
    for split, path in use.items():
        if path.is_file():
            for line in path.read_text().splitlines():
                token = line.split()[0] if line.split() else ""
                if token:
                    splits.setdefault(token, split)
    return splits


def _number(text: str | None) -> float | str | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text.strip()


def read_voc(root: Path, report: IngestReport) -> SourceDataset:
    """Parse a VOC folder into records (validation happens in the canonical writer).

    Raises:
        DataError: no annotation or image folder (the source cannot be read at all).
    """
    ann_dir = _first_dir(root, ("Annotations", "annotations"))
    img_dir = _first_dir(root, ("JPEGImages", "images", "Images"))
    if ann_dir is None or img_dir is None:
        raise DataError(
            "not a Pascal VOC folder: needs Annotations/ (or annotations/) and JPEGImages/ (or images/)",
            file=root,
            fix="point voc: at the folder holding both",
        )
    splits = read_split_lists(root)
    records: list[ImageRecord] = []
    names: set[str] = set()
    annotated: set[str] = set()
    for xml in sorted(ann_dir.glob("*.xml"), key=natural_key):
        annotated.add(xml.stem)
        rec = read_voc_xml(xml, root, img_dir, splits, names, report)
        if rec is not None:
            records.append(rec)
    check_unannotated_images(img_dir, ann_dir, annotated, report)
    if not records:
        raise DataError("no usable annotation XML found", file=ann_dir, fix="check the folder and the report")
    return SourceDataset(
        name=root.name.lower(),
        spec=f"voc:{root}",
        categories=sorted(names),
        tasks=["classification", "detection"],
        records=records,
    )


def read_voc_xml(
    xml: Path, root: Path, img_dir: Path, splits: dict[str, str], names: set[str], report: IngestReport
) -> ImageRecord | None:
    """The record of one annotation XML, or None (reported) when it is invalid or in no split list.

    Adds the object names it finds to ``names`` (also for an image left out of the split lists,
    so the categories do not depend on the split files).
    """
    stem = xml.stem
    try:
        tree = ET.parse(xml).getroot()
    except ET.ParseError as err:
        line, column = err.position
        report.add(
            xml,
            stem,
            f"invalid XML at line {line}, column {column}: {err}",
            "skipped",
            kind="invalid XML",
        )
        return None
    image = find_voc_image(tree, xml, img_dir, report)
    size = read_voc_size(tree, xml, report)
    objects = read_voc_objects(tree, stem)
    names.update(obj.category for obj in objects if obj.category)
    split = None
    if splits:
        split = splits.get(stem)
        if split is None:
            report.add(
                xml,
                stem,
                "image not listed in any ImageSets/Main split file",
                "skipped",
                kind="image in no split list",
                fix="add it to train.txt, val.txt or test.txt",
            )
            return None
    return ImageRecord(
        record=stem,
        name=image.name,
        file=image,
        ann_file=xml,
        split=split,
        key=relative_key(image, root),
        size=size,
        objects=objects,
    )


def find_voc_image(tree: ET.Element, xml: Path, img_dir: Path, report: IngestReport) -> Path:
    """The image of an annotation: its ``<filename>``, else ``<stem>.<any image suffix>`` (reported as repaired).

    When neither exists the path is still returned: the canonical writer reports the missing image.
    """
    stem = xml.stem
    filename = (tree.findtext("filename") or "").strip()
    image = img_dir / filename if filename else None
    if image is None or not image.is_file():
        found = next(
            (img_dir / f"{stem}{s}" for s in IMAGE_SUFFIXES if (img_dir / f"{stem}{s}").is_file()), None
        )
        if found is not None and image is not None:
            report.add(
                xml,
                stem,
                f"<filename> {filename!r} not found; using {found.name}",
                "repaired",
                kind="filename not found",
            )
        image = found or image or img_dir / f"{stem}.jpg"
    return image


def read_voc_size(tree: ET.Element, xml: Path, report: IngestReport) -> tuple[int, int] | None:
    """The declared ``(width, height)``, or None when absent or invalid (then reported; the decoded size is used)."""
    w, h = _number(tree.findtext("size/width")), _number(tree.findtext("size/height"))
    if isinstance(w, float) and isinstance(h, float) and 0 < w < 1e6 and 0 < h < 1e6:
        return int(w), int(h)
    if tree.find("size") is not None:
        report.add(
            xml,
            xml.stem,
            f"<size> {w!r} x {h!r} is not a valid image size; the image's own size is used",
            "repaired",
            kind="invalid image size",
        )
    return None


def read_voc_objects(tree: ET.Element, stem: str) -> list[ObjectRecord]:
    """The ``<object>`` entries as records, boxes in VOC pixels as written (the writer checks them)."""
    objects = []
    for j, obj in enumerate(tree.findall("object")):
        name = (obj.findtext("name") or "").strip()
        box_el = obj.find("bndbox")
        box = (
            None
            if box_el is None
            else [_number(box_el.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        )
        difficult = _number(obj.findtext("difficult"))
        objects.append(ObjectRecord(name, box, f"{stem}/object {j}", difficult=int(difficult == 1.0)))
    return objects


def check_unannotated_images(img_dir: Path, ann_dir: Path, annotated: set[str], report: IngestReport) -> None:
    """Report every image that has no annotation XML: it is skipped, since its objects are unknown."""
    for image in sorted(img_dir.iterdir(), key=natural_key):
        if image.suffix.lower() in IMAGE_SUFFIXES and image.stem not in annotated:
            report.add(
                image,
                image.stem,
                "image has no annotation XML",
                "skipped",
                kind="image without annotation",
                fix=f"add {ann_dir.name}/{image.stem}.xml",
            )
