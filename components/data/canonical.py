"""The writer of the canonical dataset layout (see docs/architecture.md), atomic and deterministic.

:func:`write_canonical` validates every record of a parsed :class:`SourceDataset` (the checks of
:mod:`components.data.validation`), repairs or skips it with a report line, and writes::

    DIR/dataset.json, images/<split>/, annotations/instances_<split>.json, masks/<split>/,
    classification/<split>/<class>/, ingest_report.json

into a temporary sibling folder that is renamed onto ``DIR`` only when everything succeeded, so
a crash or a strict-mode failure never leaves a half-written dataset. Output is byte-identical
for identical input: fixed JSON key order, fixed PNG encoder settings, no timestamps, timings or
absolute paths (the folder is a DVC out: its hash must repeat wherever the source lies).
Images without a source split get one from a hash of their path (:func:`split_of`), so a
growing source keeps every earlier image in its split.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from components.config import SplitConfig
from components.data.records import SPLITS, ImageRecord, ObjectRecord, SourceDataset, category_folder
from components.data.validation import (
    IngestReport,
    check_box,
    check_image,
    check_mask_size,
    check_polygons,
)
from components.errors import DataError
from components.io import write_json
from components.metrics.overlaps import box_iou_xyxy

IGNORE_INDEX = 255
FORMAT_VERSION = 1
#: PNG settings fixed so that the same pixels always give the same bytes
PNG_OPTIONS = {"format": "PNG", "compress_level": 6, "optimize": False}


def write_png(array: np.ndarray, path: Path) -> None:
    """Encode ``uint8[H, W]`` or ``uint8[H, W, 3]`` as PNG with fixed encoder settings (no metadata)."""
    Image.fromarray(array).save(path, **PNG_OPTIONS)


def _write_compact_json(data: Any, path: Path) -> None:
    """JSON in insertion key order, compact, with a trailing newline: the same data gives the same bytes."""
    write_json(data, path, indent=None, ensure_ascii=False)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE ``{"size": [H, W], "counts": str}`` of a ``bool[H, W]`` mask (pycocotools)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """``bool[H, W]`` mask of COCO polygons or RLE (compressed or not), as pycocotools' ``annToMask``."""
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {
            "size": segmentation["size"],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
    return mask_utils.decode(rle).astype(bool)


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tightest xyxy pixel box around a mask's pixels (edges, so a 1-pixel mask has size 1), or None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def split_of(key: str, split: SplitConfig, seed: int) -> str:
    """The seeded split of one image: a function of its stable key and ``data.seed`` only.

    ``sha256(f"{seed}:{key}")`` read as a number uniform in [0, 1) falls into the cumulative
    ``data.split`` fractions ``[0, train)`` -> train, ``[train, train + val)`` -> val, the rest
    -> test. No other image takes part, so adding images to a growing source never moves an
    existing one to another split (a shuffled list would), and the fractions hold on average.
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < split.train:
        return "train"
    return "val" if u < split.train + split.val else "test"


def assign_splits(records: list[ImageRecord], split: SplitConfig, seed: int) -> None:
    """Give every record without a source split a seeded one (``data.split`` fractions, ``data.seed``).

    The key is the image's path relative to the source root (:attr:`ImageRecord.key`; the record
    id when a reader gives none): see :func:`split_of`. Splits the source ships are kept.
    """
    for rec in records:
        if rec.split is None:
            rec.split = split_of(rec.key or rec.record, split, seed)


def source_label(spec: str) -> str:
    """``dataset.json``'s ``source``: the spec with its path cut to the last name (``voc:/a/b/VOC`` -> ``voc:VOC``)."""
    kind, sep, arg = spec.partition(":")
    return f"{kind}:{Path(arg).name}" if sep else spec


def _unique_name(name: str, used: set[str]) -> str:
    if name not in used:
        used.add(name)
        return name
    stem, dot, suffix = name.rpartition(".")
    stem, suffix = (stem, f".{suffix}") if dot else (name, "")
    n = 1
    while f"{stem}_{n}{suffix}" in used:
        n += 1
    used.add(f"{stem}_{n}{suffix}")
    return f"{stem}_{n}{suffix}"


class _Writer:
    """State of one canonical write: the temporary folder, ids, counters."""

    def __init__(self, source: SourceDataset, root: Path, report: IngestReport, duplicate_iou: float):
        self.source = source
        self.root = root
        self.report = report
        self.duplicate_iou = duplicate_iou
        self.cat_ids = {name: k for k, name in enumerate(source.categories, start=1)}
        self.has_masks = "instance_segmentation" in source.tasks
        self.has_semantic = "semantic_segmentation" in source.tasks
        self.has_detection = "detection" in source.tasks
        self.writes_images = self.has_detection or self.has_semantic
        self.objects = Counter()
        self.crops = 0

    # ------------------------------------------------------------------ one record

    def _where(self, rec: ImageRecord) -> Path | str:
        return rec.ann_file or rec.file or self.source.spec

    def unknown_category_fix(self, category: str) -> str:
        if self.source.classes_from_params:
            return (
                f"add {category!r} to data.classes in params.yaml (now {self.source.categories}), "
                "or relabel the object"
            )
        return f"use one of {self.source.categories}"

    def load_pixels(self, rec: ImageRecord) -> tuple[int, int] | None:
        """Check the image; return ``(width, height)`` or None when the record is skipped."""
        if rec.pixels is not None:
            return rec.pixels.shape[1], rec.pixels.shape[0]
        assert rec.file is not None
        check = check_image(rec.file)
        if check.problem:
            self.report.add(
                rec.file, rec.record, check.problem, "skipped", kind=check.kind or "unreadable image"
            )
            return None
        if rec.size is not None and tuple(rec.size) != (check.width, check.height):
            self.report.add(
                self._where(rec),
                rec.record,
                f"declared size {rec.size[0]}x{rec.size[1]} differs from the image's {check.width}x{check.height}",
                "repaired",
                kind="declared size differs",
                fix="correct <size> in the annotation; the decoded image size is used",
            )
        return check.width, check.height

    def load_label_image(self, rec: ImageRecord, width: int, height: int) -> np.ndarray | None:
        """Read ``rec.mask_file`` as ``uint8/int[H, W]``; None (reported) when missing, unreadable or mis-sized."""
        assert rec.mask_file is not None
        check = check_image(rec.mask_file)
        if check.problem:
            self.report.add(
                rec.mask_file, rec.record, f"mask: {check.problem}", "skipped", kind=f"mask: {check.kind}"
            )
            return None
        with Image.open(rec.mask_file) as img:
            array = np.asarray(img.convert("L") if img.mode in ("RGB", "RGBA", "LA") else img)
        problem = check_mask_size(array, width, height)
        if problem:
            self.report.add(
                rec.mask_file,
                rec.record,
                problem,
                "skipped",
                kind="mask size differs",
                fix="give the mask its image's size",
            )
            return None
        return array

    def object_mask(
        self, obj: ObjectRecord, rec: ImageRecord, width: int, height: int
    ) -> tuple[np.ndarray | None, bool]:
        """The object's ``bool[H, W]`` mask (None if it has none) and whether it is usable."""
        where = self._where(rec)
        if obj.mask is not None:
            problem = check_mask_size(obj.mask, width, height)
            if problem:
                self.report.add(where, obj.record, problem, "skipped", kind="mask size differs")
                return None, False
            return obj.mask.astype(bool), True
        if obj.rle is not None:
            size = obj.rle.get("size") if isinstance(obj.rle, dict) else None
            counts = obj.rle.get("counts") if isinstance(obj.rle, dict) else None
            well_formed = (
                isinstance(size, list)
                and len(size) == 2
                and all(isinstance(v, int) for v in size)
                and (
                    isinstance(counts, str)
                    or (isinstance(counts, list) and all(isinstance(v, int) for v in counts))
                )
            )
            if not well_formed:
                self.report.add(
                    where,
                    obj.record,
                    "malformed RLE: needs size [H, W] and counts (string or integers)",
                    "skipped",
                    kind="malformed RLE",
                )
                return None, False
            if list(size) != [height, width]:
                self.report.add(
                    where,
                    obj.record,
                    f"mask size {size[1]}x{size[0]} differs from its image's {width}x{height}",
                    "skipped",
                    kind="mask size differs",
                )
                return None, False
            try:
                return decode_segmentation(obj.rle, height, width), True
            except (ValueError, TypeError, UnicodeError) as err:
                self.report.add(where, obj.record, f"malformed RLE: {err}", "skipped", kind="malformed RLE")
                return None, False
        if obj.polygons is not None:
            polygons, problems = check_polygons(obj.polygons)
            if not polygons:
                self.report.add(
                    where,
                    obj.record,
                    "; ".join(problems) or "malformed polygon: empty",
                    "skipped",
                    kind="malformed polygon",
                )
                return None, False
            if problems:
                self.report.add(
                    where,
                    obj.record,
                    "; ".join(problems),
                    "repaired",
                    kind="malformed polygon",
                    fix="the well-formed polygons are kept",
                )
            return decode_segmentation(polygons, height, width), True
        return None, True

    def validate_objects(
        self, rec: ImageRecord, width: int, height: int
    ) -> list[tuple[ObjectRecord, tuple[float, float, float, float], np.ndarray | None]]:
        """Validated objects ``[(object, xyxy box, mask or None)]``, every decision reported.

        Objects are checked in order, so a duplicate is always the later of two overlapping boxes.
        """
        where = self._where(rec)
        kept: list[tuple[ObjectRecord, tuple[float, float, float, float], np.ndarray | None]] = []
        for obj in rec.objects:
            checked = self.check_object(obj, rec, where, width, height, kept)
            if checked is not None:
                kept.append(checked)
        return kept

    def check_object(
        self,
        obj: ObjectRecord,
        rec: ImageRecord,
        where: Path | str,
        width: int,
        height: int,
        kept: list[tuple[ObjectRecord, tuple[float, float, float, float], np.ndarray | None]],
    ) -> tuple[ObjectRecord, tuple[float, float, float, float], np.ndarray | None] | None:
        """``(object, xyxy box, mask or None)`` when ``obj`` is usable, else None (the reason reported).

        The checks run in a fixed order (category, mask, box, empty mask, duplicate of ``kept``)
        so that each skipped object gets exactly one report line, the first problem found.
        """
        if obj.category not in self.cat_ids:
            self.report.add(
                where,
                obj.record,
                f"unknown category {obj.category!r}",
                "skipped",
                kind="unknown category",
                fix=self.unknown_category_fix(obj.category),
            )
            return None
        mask, ok = self.object_mask(obj, rec, width, height)
        if not ok:
            return None
        if self.has_masks and mask is None:
            self.report.add(
                where,
                obj.record,
                "annotation has no segmentation in a dataset with masks",
                "skipped",
                kind="annotation without segmentation",
            )
            return None
        box = self.check_object_box(obj, where, mask, width, height)
        if box is None:
            return None
        if mask is not None and not mask.any():
            self.report.add(
                where, obj.record, "empty mask: no pixel inside the image", "skipped", kind="empty mask"
            )
            return None
        duplicate = self._duplicate_of(obj, box, kept)
        if duplicate is not None:
            other, iou = duplicate
            self.report.add(
                where,
                obj.record,
                f"duplicate box: IoU {iou:.2f} with {other.record} of the same category",
                "skipped",
                kind="duplicate box",
                fix="remove the duplicate annotation",
            )
            return None
        return obj, box, mask

    def check_object_box(
        self, obj: ObjectRecord, where: Path | str, mask: np.ndarray | None, width: int, height: int
    ) -> tuple[float, float, float, float] | None:
        """The object's xyxy box, clipped to the image (reported), or the box of its mask when it has none.

        None (reported) when it has neither, its mask is empty or its box is unusable.
        """
        if obj.box is None:
            if mask is None:
                self.report.add(
                    where,
                    obj.record,
                    "annotation has neither a box nor a mask",
                    "skipped",
                    kind="annotation without box or mask",
                )
                return None
            box = mask_to_box(mask)
            if box is None:
                self.report.add(
                    where,
                    obj.record,
                    "empty mask: no pixel inside the image",
                    "skipped",
                    kind="empty mask",
                )
            return box
        check = check_box(obj.box, width, height)
        if check.box is None:
            self.report.add(
                where,
                obj.record,
                check.problem or "invalid box",
                "skipped",
                kind=check.kind or "invalid box",
            )
            return None
        if check.repaired:
            self.report.add(
                where,
                obj.record,
                check.problem or "box repaired",
                "repaired",
                kind=check.kind or "box outside the image",
                fix="the box is clipped to the image",
            )
        return check.box

    def _duplicate_of(
        self,
        obj: ObjectRecord,
        box: tuple[float, float, float, float],
        kept: list[tuple[ObjectRecord, tuple[float, float, float, float], np.ndarray | None]],
    ) -> tuple[ObjectRecord, float] | None:
        """The first kept object of the same category whose box overlaps ``box`` at IoU >= ``duplicate_iou``."""
        same = [(other, other_box) for other, other_box, _ in kept if other.category == obj.category]
        if not same:
            return None
        iou = box_iou_xyxy(np.array([box]), np.array([b for _, b in same]))[0]
        hits = np.flatnonzero(iou >= self.duplicate_iou)
        return (same[hits[0]][0], float(iou[hits[0]])) if len(hits) else None

    # ------------------------------------------------------------------ writing

    def write_crops(
        self,
        split: str,
        image: Image.Image,
        stem: str,
        ann_id: int,
        category: str,
        box: tuple[float, ...],
        *,
        jpeg: bool,
    ) -> None:
        """Write one object crop to ``classification/<split>/<category>/<stem>_<ann_id>.(png|jpg)``."""
        left, top = int(np.floor(box[0])), int(np.floor(box[1]))
        right, bottom = int(np.ceil(box[2])), int(np.ceil(box[3]))
        crop = image.crop((left, top, right, bottom))
        if self.source.crop_size:
            crop = crop.resize((self.source.crop_size, self.source.crop_size), Image.BILINEAR)
        folder = self.root / "classification" / split / category_folder(category)
        folder.mkdir(parents=True, exist_ok=True)
        # crops of photographs: JPEG at high quality is 10x faster to encode than PNG, and as faithful
        if jpeg:
            crop.save(folder / f"{stem}_{ann_id}.jpg", format="JPEG", quality=95)
        else:
            crop.save(folder / f"{stem}_{ann_id}.png", **PNG_OPTIONS)
        self.crops += 1

    def write_split(self, split: str, records: list[ImageRecord], progress: tqdm) -> dict[str, Any]:
        """Write one split's records and its ``annotations/instances_<split>.json``; return its counts.

        Image and annotation ids count from 1 in record order within the split, so the same
        records always give the same ids (and the same bytes).
        """
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        used: set[str] = set()
        for rec in records:
            progress.update(1)
            size = self.load_pixels(rec)
            if size is None:
                continue
            if self.writes_images:
                self.write_record(split, rec, size, images, annotations, used)
            else:  # classification-only source: the images are the ImageFolder view
                self.write_class_image(split, rec, images)
        if self.writes_images and images:
            categories = [{"id": k, "name": n} for n, k in self.cat_ids.items()]
            _write_compact_json(
                {"images": images, "annotations": annotations, "categories": categories},
                self.root / "annotations" / f"instances_{split}.json",
            )
        return {"images": len(images), "objects": len(annotations)}

    def write_class_image(self, split: str, rec: ImageRecord, images: list[dict[str, Any]]) -> None:
        """Copy a labelled image to ``classification/<split>/<class>/`` (skipped, reported, if its class is unknown)."""
        assert rec.file is not None and rec.label is not None
        if rec.label not in self.cat_ids:
            self.report.add(
                rec.file,
                rec.record,
                f"unknown class {rec.label!r}",
                "skipped",
                kind="unknown category",
                fix=self.unknown_category_fix(rec.label),
            )
            return
        folder = self.root / "classification" / split / category_folder(rec.label)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(rec.file, folder / rec.name)
        images.append({"id": len(images) + 1, "file_name": rec.name})
        self.objects[rec.label] += 1

    def write_record(
        self,
        split: str,
        rec: ImageRecord,
        size: tuple[int, int],
        images: list[dict[str, Any]],
        annotations: list[dict[str, Any]],
        used: set[str],
    ) -> None:
        """Write one image with its validated objects: the image file, its annotations, crops and class map.

        Appends the image's entry to ``images`` and its objects to ``annotations``; ``used``
        holds the file names taken so far in the split (a clash gets a numbered name).
        """
        width, height = size
        semantic = rec.semantic
        if rec.mask_file is not None:
            usable, semantic = self.read_label_mask(rec, width, height)
            if not usable:
                return
        objects = self.validate_objects(rec, width, height)

        name = _unique_name(rec.name, used)
        stem = Path(name).stem
        image_id = len(images) + 1
        folder = self.root / "images" / split
        if rec.pixels is not None:
            write_png(rec.pixels, folder / name)
        else:
            assert rec.file is not None
            shutil.copyfile(rec.file, folder / name)
        images.append(
            {"id": image_id, "file_name": name, "width": width, "height": height, "source_record": rec.record}
        )

        if self.has_semantic and semantic is None:
            semantic = self.build_class_map(objects, width, height)
        self.write_objects(split, rec, image_id, stem, objects, annotations)
        if self.has_semantic and semantic is not None:
            write_png(semantic.astype(np.uint8), self.root / "masks" / split / f"{stem}.png")

    def read_label_mask(self, rec: ImageRecord, width: int, height: int) -> tuple[bool, np.ndarray | None]:
        """Read ``rec.mask_file``: an instance mask becomes ``rec.objects``, a binary one the class map.

        Returns:
            ``(usable, class map)``: usable is False (reported) when the mask or its category is
            unusable; the class map is ``uint8[H, W]`` for a binary mask, else ``rec.semantic``.
        """
        label = self.load_label_image(rec, width, height)
        if label is None:
            return False, None
        assert rec.mask_file is not None
        category = rec.label or self.source.categories[0]
        if category not in self.cat_ids:
            self.report.add(
                rec.mask_file,
                rec.record,
                f"unknown category {category!r}",
                "skipped",
                kind="unknown category",
                fix=self.unknown_category_fix(category),
            )
            return False, None
        if rec.mask_kind == "instance":
            rec.objects = [
                ObjectRecord(
                    category,
                    None,
                    f"{rec.record}/instance {int(v)}",
                    mask=label == v,
                )
                for v in np.unique(label)
                if v != 0
            ]
            return True, rec.semantic
        # binary: the category is the dark or bright pixels
        fg = label < 128 if self.source.binary_foreground == "dark" else label >= 128
        return True, fg.astype(np.uint8) * np.uint8(self.cat_ids[category])

    def build_class_map(
        self,
        objects: list[tuple[ObjectRecord, tuple[float, float, float, float], np.ndarray | None]],
        width: int,
        height: int,
    ) -> np.ndarray:
        """The ``uint8[H, W]`` class map drawn from instance masks (crowd regions are ``IGNORE_INDEX``)."""
        semantic = np.zeros((height, width), dtype=np.uint8)
        for obj, _box, mask in objects:  # drawing order: a later instance wins where two overlap
            if mask is not None:
                semantic[mask] = IGNORE_INDEX if obj.iscrowd else self.cat_ids[obj.category]
        return semantic

    def write_objects(
        self,
        split: str,
        rec: ImageRecord,
        image_id: int,
        stem: str,
        objects: list[tuple[ObjectRecord, tuple[float, float, float, float], np.ndarray | None]],
        annotations: list[dict[str, Any]],
    ) -> None:
        """Append the COCO annotations of one image's objects and write their crops (classification view)."""
        pil_image = None
        jpeg_source = rec.file is not None and rec.file.suffix.lower() in (".jpg", ".jpeg")
        if "classification" in self.source.tasks and objects:
            pil_image = (
                Image.fromarray(rec.pixels)
                if rec.pixels is not None
                else Image.open(rec.file).convert("RGB")
            )
        for obj, box, mask in objects:
            ann_id = len(annotations) + 1
            x0, y0, x1, y1 = box
            ann: dict[str, Any] = {
                "id": ann_id,
                "image_id": image_id,
                "category_id": self.cat_ids[obj.category],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(mask.sum()) if mask is not None else (x1 - x0) * (y1 - y0),
                "iscrowd": int(obj.iscrowd),
            }
            if mask is not None:
                ann["segmentation"] = encode_rle(mask)
            if obj.difficult:
                ann["difficult"] = 1
            elif self.source.spec.startswith("voc:"):
                ann["difficult"] = 0
            annotations.append(ann)
            self.objects[obj.category] += 1
            if pil_image is not None and not obj.iscrowd:
                self.write_crops(split, pil_image, stem, ann_id, obj.category, box, jpeg=jpeg_source)


def write_canonical(
    source: SourceDataset,
    out: Path,
    *,
    report: IngestReport,
    split: SplitConfig,
    seed: int,
    duplicate_iou: float,
    params: dict[str, Any],
    show_progress: bool = True,
) -> dict[str, Any]:
    """Validate and write ``source`` as the canonical layout at ``out`` (atomically replaced).

    Args:
        source: a parsed source (records not yet validated).
        out: the dataset folder to (re)create.
        report: collects every decision; in strict mode it raises on the first one.
        split: fractions of the seeded split for records without a source split.
        seed: seed of that split.
        duplicate_iou: boxes of one category overlapping an earlier one by at least this IoU are duplicates.
        params: the params that produced the dataset, recorded in ``dataset.json``.
        show_progress: draw a tqdm bar.

    Returns:
        the manifest (``dataset.json``'s content).

    Raises:
        DataError: strict mode and a problem, or nothing usable remains.
    """
    assign_splits(source.records, split, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        writer = _Writer(source, tmp, report, duplicate_iou)
        splits = write_splits(writer, source, show_progress=show_progress)
        _remove_empty_folders(tmp)
        if not splits:
            raise DataError(
                f"nothing usable remains after validation ({report.counts()['by_kind']})",
                file=source.spec,
                fix="fix the records named in the report above, or point --source at the right folder",
            )
        manifest = build_manifest(source, writer, splits, params)
        _write_compact_json(manifest, tmp / "dataset.json")
        _write_compact_json(report.as_dict(), tmp / "ingest_report.json")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def write_splits(writer: _Writer, source: SourceDataset, *, show_progress: bool) -> dict[str, dict[str, int]]:
    """Create the layout's folders in ``writer.root`` and write every split; ``{split: counts}`` of non-empty splits."""
    tmp = writer.root
    for s in SPLITS:
        if writer.writes_images:
            (tmp / "images" / s).mkdir(parents=True)
            if writer.has_semantic:
                (tmp / "masks" / s).mkdir(parents=True)
    (tmp / "annotations").mkdir()
    splits: dict[str, Any] = {}
    quiet = {} if show_progress else {"disable": True}  # else TQDM_DISABLE in the environment decides
    with tqdm(
        total=len(source.records), desc=f"ingest {source.name}", unit="img", file=sys.stderr, **quiet
    ) as progress:
        for s in SPLITS:
            records = [r for r in source.records if r.split == s]
            if records:
                counts = writer.write_split(s, records, progress)
                if counts["images"]:
                    splits[s] = counts
    return splits


def _remove_empty_folders(tmp: Path) -> None:
    """Drop the folders of splits (and views) the source lacks, so the layout lists only what exists."""
    for s in SPLITS:
        for folder in (tmp / "images" / s, tmp / "masks" / s):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    for folder in (tmp / "images", tmp / "masks", tmp / "annotations"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def build_manifest(
    source: SourceDataset, writer: _Writer, splits: dict[str, dict[str, int]], params: dict[str, Any]
) -> dict[str, Any]:
    """The content of ``dataset.json``: tasks, categories, per-split counts and the params that produced it."""
    return {
        "format_version": FORMAT_VERSION,
        "name": source.name,
        "source": source_label(source.spec),
        "tasks": list(source.tasks),
        "categories": list(source.categories),
        "splits": {s: v["images"] for s, v in splits.items()},
        "objects": {s: v["objects"] for s, v in splits.items()},
        "objects_per_category": {c: writer.objects.get(c, 0) for c in source.categories},
        "crops": writer.crops,
        "ignore_index": IGNORE_INDEX,
        "params": params,
    }


def _replace(tmp: Path, out: Path) -> None:
    """Move ``tmp`` onto ``out``: rename the old folder away first, then rename, then delete the old one."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
