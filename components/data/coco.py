"""COCO instances reader: ``coco:FILE.json`` (images in ``images/`` beside it, or ``--images``) or
``coco:DIR`` holding ``annotations/instances_<split>.json`` + ``images/<split>/`` (the canonical
layout itself, so a canonical dataset re-ingests to the same boxes and masks).

A file that is not JSON, or not a COCO instances object, cannot be read at all: that fails in
both modes with the file and the line/column. Problems of single records (duplicate ids,
annotations of missing images, unknown categories) go to the report. So does an image whose
``file_name`` escapes the images folder (absolute, a drive, or ``..``): an annotation file must not
make ingest read (and copy into the dataset) arbitrary files of the machine; strict mode refuses
it, repair mode skips the image and its annotations.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from components.data.records import SPLITS, ImageRecord, ObjectRecord, SourceDataset
from components.data.validation import IngestReport, load_json
from components.errors import DataError


def _categories(data: dict[str, Any], path: Path, report: IngestReport) -> dict[int, str]:
    cats: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        if (
            not isinstance(cat, dict)
            or not isinstance(cat.get("id"), int)
            or not isinstance(cat.get("name"), str)
        ):
            report.add(
                path,
                f"categories[{i}]",
                "malformed category: needs integer id and name",
                "skipped",
                kind="malformed category",
            )
        elif cat["id"] in cats:
            report.add(
                path,
                f"category {cat['id']}",
                f"duplicate category id {cat['id']}",
                "skipped",
                kind="duplicate category id",
            )
        elif cat["name"] in cats.values():
            report.add(
                path,
                f"category {cat['id']}",
                f"duplicate category name {cat['name']!r}",
                "skipped",
                kind="duplicate category name",
            )
        else:
            cats[cat["id"]] = cat["name"]
    return dict(sorted(cats.items()))


def escaping_file_name(file_name: str) -> str | None:
    """Why a COCO ``file_name`` would reach outside the images folder, or None when it stays inside.

    Lexical checks only, on both path flavours (a JSON written on Windows may use backslashes):
    an absolute path, a drive or UNC prefix, or a ``..`` component. Symbolic links inside the
    images folder are allowed (DVC's symlink cache uses them).
    """
    posix = PurePosixPath(file_name.replace("\\", "/"))
    windows = PureWindowsPath(file_name)
    if posix.is_absolute() or windows.drive or windows.is_absolute():
        return "is an absolute path"
    if ".." in posix.parts:
        return "climbs out of the images folder with '..'"
    if not file_name.strip():
        return "is empty"
    return None


def _box_xywh_to_xyxy(bbox: Any) -> Any:
    if isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox):
        x, y, w, h = (float(v) for v in bbox)
        return [x, y, x + w, y + h]
    return bbox if isinstance(bbox, list) else None


def read_coco_file(
    path: Path, images: Path, split: str | None, report: IngestReport
) -> tuple[dict[int, str], list[ImageRecord], bool]:
    """Parse one instances JSON.

    Returns:
        (categories ``{source id: name}``, image records, whether any annotation has a segmentation).
    """
    data = read_instances_json(path)
    cats = _categories(data, path, report)
    by_id = read_coco_images(data["images"], path, images, split, report)
    has_masks = read_coco_annotations(data.get("annotations", []), path, by_id, cats, report)
    return cats, list(by_id.values()), has_masks


def read_instances_json(path: Path) -> dict[str, Any]:
    """The parsed instances JSON; a file that is not one cannot be repaired and fails in both modes.

    Raises:
        DataError: missing file, invalid JSON, or no ``images``/``categories``/``annotations`` lists.
    """
    if not path.is_file():
        raise DataError("annotation file not found", file=path, fix="check the coco: path")
    data = load_json(path, fix="repair or re-export the annotation file")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("categories"), list)
    ):
        raise DataError(
            "not a COCO instances file: needs lists 'images' and 'categories' (and 'annotations')",
            file=path,
            fix="point coco: at an instances JSON",
        )
    if not isinstance(data.get("annotations", []), list):
        raise DataError("'annotations' is not a list", file=path, fix="re-export the annotation file")
    return data


def read_coco_images(
    entries: list[Any], path: Path, images: Path, split: str | None, report: IngestReport
) -> dict[int, ImageRecord]:
    """Image records by COCO id, in file order; malformed, duplicate and escaping entries are reported and skipped."""
    by_id: dict[int, ImageRecord] = {}
    for i, im in enumerate(entries):
        if not check_coco_image(im, i, path, by_id, report):
            continue
        w, h = im.get("width"), im.get("height")
        size = (int(w), int(h)) if all(isinstance(v, (int, float)) and 0 < v < 1e6 for v in (w, h)) else None
        if size is None and (w is not None or h is not None):
            report.add(
                path,
                f"image {im['id']}",
                f"width/height {w!r} x {h!r} is not a valid image size; the image's own size is used",
                "repaired",
                kind="invalid image size",
            )
        by_id[im["id"]] = ImageRecord(
            record=f"image {im['id']}",
            name=Path(im["file_name"]).name,
            file=images / im["file_name"],
            ann_file=path,
            split=split,
            key=PurePosixPath(im["file_name"].replace("\\", "/")).as_posix(),
            size=size,
        )
    return by_id


def check_coco_image(im: Any, i: int, path: Path, by_id: dict[int, ImageRecord], report: IngestReport) -> bool:
    """Whether the ``images[i]`` entry is usable: well-formed, a new id, a ``file_name`` inside the images folder.

    An unusable entry is reported (an escaping ``file_name`` would make ingest copy an
    arbitrary file of the machine into the dataset).
    """
    if (
        not isinstance(im, dict)
        or not isinstance(im.get("id"), int)
        or not isinstance(im.get("file_name"), str)
    ):
        report.add(
            path,
            f"images[{i}]",
            "malformed image entry: needs integer id and file_name",
            "skipped",
            kind="malformed image entry",
        )
        return False
    if im["id"] in by_id:
        report.add(
            path,
            f"image {im['id']}",
            f"duplicate image id {im['id']} ({im['file_name']})",
            "skipped",
            kind="duplicate image id",
            fix="give every image a unique id",
        )
        return False
    escape = escaping_file_name(im["file_name"])
    if escape is not None:
        report.add(
            path,
            f"image {im['id']}",
            f"file_name {im['file_name']!r} {escape}: it would read a file outside the images folder",
            "skipped",
            kind="file_name outside the images folder",
            fix="make file_name relative to the images folder (e.g. '000123.jpg' or 'sub/000123.jpg')",
        )
        return False
    return True


def read_coco_annotations(
    entries: list[Any], path: Path, by_id: dict[int, ImageRecord], cats: dict[int, str], report: IngestReport
) -> bool:
    """Append each annotation to its image's ``objects``; return whether any has a segmentation.

    Annotations of missing images are skipped (reported); an unknown category is kept as a
    ``<category_id N>`` placeholder so that validation reports it with its record.
    """
    seen_ann: set[Any] = set()
    has_masks = False
    for i, ann in enumerate(entries):
        if not isinstance(ann, dict):
            report.add(
                path,
                f"annotations[{i}]",
                "malformed annotation: not an object",
                "skipped",
                kind="malformed annotation",
            )
            continue
        ident = f"annotation {ann.get('id', f'[{i}]')}"
        ann_key = json.dumps(ann.get("id"), sort_keys=True)  # any JSON value, hashable
        if ann_key in seen_ann:
            report.add(
                path,
                ident,
                f"duplicate annotation id {ann.get('id')}",
                "repaired",
                kind="duplicate annotation id",
                fix="annotation ids are renumbered in the canonical layout",
            )
        seen_ann.add(ann_key)
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        image = by_id.get(image_id) if isinstance(image_id, int) else None
        if image is None:
            report.add(
                path,
                ident,
                f"annotation points at a missing image (image_id {ann.get('image_id')!r})",
                "skipped",
                kind="annotation of a missing image",
            )
            continue
        category = cats.get(category_id) if isinstance(category_id, int) else None
        seg = ann.get("segmentation")
        polygons = seg if isinstance(seg, list) and seg else None
        rle = seg if isinstance(seg, dict) else None
        has_masks |= polygons is not None or rle is not None
        image.objects.append(
            ObjectRecord(
                category if category is not None else f"<category_id {ann.get('category_id')!r}>",
                _box_xywh_to_xyxy(ann.get("bbox")),
                ident,
                polygons=polygons,
                rle=rle,
                iscrowd=int(bool(ann.get("iscrowd", 0))),
            )
        )
    return has_masks


def read_coco(target: Path, images: Path | None, report: IngestReport) -> SourceDataset:
    """Parse ``coco:FILE.json`` or a ``coco:DIR`` with ``annotations/instances_<split>.json``."""
    if target.is_dir():
        files = [(s, target / "annotations" / f"instances_{s}.json") for s in SPLITS]
        files = [(s, f) for s, f in files if f.is_file()]
        if not files:
            raise DataError(
                "no annotations/instances_<split>.json in the folder",
                file=target,
                fix="point coco: at an instances JSON file or a folder with annotations/instances_train.json",
            )
        parts = [(s, f, (images / s) if images else target / "images" / s) for s, f in files]
    else:
        parts = [(None, target, images or target.parent / "images")]
    categories: dict[int, str] | None = None
    records: list[ImageRecord] = []
    any_masks = False
    for split, path, image_dir in parts:
        cats, recs, has_masks = read_coco_file(path, image_dir, split, report)
        if categories is not None and cats != categories:
            raise DataError(
                "categories differ between split files",
                file=path,
                fix="give every instances_<split>.json the same categories",
            )
        categories = cats
        records.extend(recs)
        any_masks |= has_masks
    assert categories is not None
    tasks = ["classification", "detection"] + (
        ["instance_segmentation", "semantic_segmentation"] if any_masks else []
    )
    return SourceDataset(
        name=(target.name if target.is_dir() else target.stem).lower(),
        spec=f"coco:{target}",
        categories=list(categories.values()),
        tasks=tasks,  # type: ignore[arg-type]
        records=records,
    )
