"""YOLO reader: a data yaml (``names``, ``train``/``val``/``test`` image folders, optional ``path``)
and one ``labels/.../<stem>.txt`` per image, beside ``images/`` as Ultralytics lays it out.

A label line is ``class cx cy w h`` (normalised to [0, 1]) or, for segmentation labels,
``class x1 y1 x2 y2 ...`` (a normalised polygon). A missing label file means a background image.
Category ids follow ``names`` (its index is the class number the labels use).

A plain folder (a data yaml without ``train``/``val``/``test``, or only ``classes.txt``, one
name a line, as LabelImg writes it) is read from ``images/`` + ``labels/``; its images get the
seeded split from their path relative to the folder, stable as the folder grows.

Real labels as they come: a box that leaves the image only by the rounding of its normalised
coordinates (:data:`ROUNDING_TOLERANCE`) is clipped silently; a label file whose image is
missing is reported with the number of boxes lost.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, UnidentifiedImageError

from components.data.records import (
    SPLITS,
    ImageRecord,
    ObjectRecord,
    SourceDataset,
    list_images,
    natural_key,
    relative_key,
)
from components.data.validation import IngestReport
from components.errors import DataError

#: how far (in pixels) a box may leave the image and still count as float rounding of normalised
#: coordinates, clipped without a report: the larger of half a pixel and 1e-3 of the image side
ROUNDING_TOLERANCE = (0.5, 1e-3)


def load_data_yaml(root: Path) -> tuple[Path, dict[str, Any]]:
    """Find and parse the data yaml (``data.yaml``, else the only ``*.yaml``) in ``root``.

    Without a yaml, ``classes.txt`` (one class name a line) gives the names of a plain folder.
    """
    candidates = [root / "data.yaml"] if (root / "data.yaml").is_file() else sorted(root.glob("*.y*ml"))
    if not candidates and (root / "classes.txt").is_file():
        path = root / "classes.txt"
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as err:
            raise DataError(
                f"not UTF-8 text: {err.reason}", file=path, record=f"byte {err.start}", fix="save it as UTF-8"
            ) from None
        return path, {"names": names}
    if not candidates:
        raise DataError(
            "no data.yaml in the YOLO folder",
            file=root,
            fix="add data.yaml with names and train/val paths (or classes.txt beside images/ and labels/)",
        )
    path = candidates[0]
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DataError(
            f"not valid YAML: {getattr(err, 'problem', err)}",
            file=path,
            record=f"line {mark.line + 1}, column {mark.column + 1}" if mark else None,
            fix="repair the data yaml",
        ) from None
    if not isinstance(data, dict) or "names" not in data:
        raise DataError("data yaml has no 'names'", file=path, fix="list the class names under names:")
    return path, data


def _names(data: dict[str, Any], path: Path) -> list[str]:
    names = data["names"]
    if isinstance(names, dict):
        if not all(isinstance(k, int) for k in names):
            raise DataError("names keys must be class indices 0..nc-1", file=path, record="names")
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise DataError(
                "names must be indexed 0..nc-1", file=path, record="names", fix="renumber the class names"
            )
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise DataError("names must be a non-empty list of class names", file=path, record="names")
    if "nc" in data and data["nc"] != len(names):
        raise DataError(f"nc is {data['nc']} but {len(names)} names are listed", file=path, record="nc")
    return [str(n) for n in names]


def _label_file(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder in the path becomes ``labels``, suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def clip_rounding(box: list[float], width: int, height: int) -> list[float]:
    """Pull coordinates that leave the image by at most :data:`ROUNDING_TOLERANCE` back onto its edge.

    ``cx + w / 2`` of a box touching the right edge is often ``1.0000001`` in a label file;
    that is rounding, not a flaw. Coordinates further out are left for the canonical writer's
    check (clipped and reported, or skipped).
    """
    out = list(box)
    for i, side in enumerate((width, height, width, height)):
        tol = max(ROUNDING_TOLERANCE[0], ROUNDING_TOLERANCE[1] * side)
        if -tol <= out[i] < 0:
            out[i] = 0.0
        elif side < out[i] <= side + tol:
            out[i] = float(side)
    return out


def _parse_labels(label: Path, image: Path, names: list[str], report: IngestReport) -> list[ObjectRecord]:
    try:
        with Image.open(image) as img:
            width, height = img.size
    except (OSError, UnidentifiedImageError):
        return []  # the canonical writer reports the unreadable image
    objects: list[ObjectRecord] = []
    try:
        lines = label.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        report.add(
            label,
            image.stem,
            f"label file is not UTF-8 text: {err.reason} at byte {err.start}",
            "skipped",
            kind="label file not UTF-8",
        )
        return []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = f"{image.stem} line {n}"
        tokens = line.split()
        try:
            cls = int(tokens[0])
            values = [float(t) for t in tokens[1:]]
        except ValueError:
            report.add(
                label,
                record,
                f"malformed label line: {line.strip()!r}",
                "skipped",
                kind="malformed label line",
            )
            continue
        if not all(math.isfinite(v) for v in values):
            report.add(
                label,
                record,
                f"NaN or infinite coordinate: {line.strip()!r}",
                "skipped",
                kind="non-finite coordinate",
            )
            continue
        category = names[cls] if 0 <= cls < len(names) else f"<class {cls}>"
        if len(values) == 4:
            cx, cy, w, h = values
            box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
            box = clip_rounding(box, width, height)
            objects.append(ObjectRecord(category, box, record))
        elif len(values) >= 6 and len(values) % 2 == 0:
            polygon = [v * (width if i % 2 == 0 else height) for i, v in enumerate(values)]
            objects.append(ObjectRecord(category, None, record, polygons=[polygon]))
        else:
            report.add(
                label,
                record,
                f"malformed label line: {len(values)} numbers after the class "
                "(4 for a box, an even number >= 6 for a polygon)",
                "skipped",
                kind="malformed label line",
            )
    return objects


def _count_label_lines(label: Path) -> int:
    """Non-empty lines (boxes or polygons) of a label file; 0 when it cannot be read."""
    try:
        return sum(
            1 for line in label.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()
        )
    except OSError:
        return 0


def report_orphan_labels(folder: Path, images: list[Path], report: IngestReport) -> None:
    """Report every label file of ``folder``'s labels folder whose image is missing (its boxes are lost)."""
    labels_dir = _label_file(folder / "_.jpg").parent
    if not labels_dir.is_dir():
        return
    stems = {image.stem for image in images}
    for label in sorted(labels_dir.glob("*.txt"), key=natural_key):
        if label.stem in stems or label.name.startswith(".") or label.name == "classes.txt":
            continue
        n = _count_label_lines(label)
        report.add(
            label,
            label.stem,
            f"label without image: {n} {'box' if n == 1 else 'boxes'} lost",
            "skipped",
            kind="label without image",
            fix=f"add the image {label.stem}.jpg (or .png) to {folder.name}/, or delete {label.name}",
        )


def _image_folders(base: Path, path: Path, data: dict[str, Any]) -> list[tuple[str | None, Path]]:
    """``[(split, image folder)]`` of the data yaml; a plain folder (no split entries) is ``[(None, images/)]``."""
    folders: list[tuple[str | None, Path]] = []
    for split in SPLITS:
        entry = data.get(split) or (data.get("valid") if split == "val" else None)
        if not entry:
            continue
        entries = entry if isinstance(entry, list) else [entry]
        if not all(isinstance(e, str) for e in entries):
            raise DataError(
                f"the {split} entry is not a folder path or a list of them: {entry!r}",
                file=path,
                record=split,
                fix=f"write e.g. `{split}: images/{split}` in {path.name}",
            )
        folders.extend((split, base / e) for e in entries)
    if not folders:  # a plain folder: images/ (or the folder itself) + labels/, seeded split
        folders = [(None, base / "images" if (base / "images").is_dir() else base)]
    for split, folder in folders:
        if not folder.is_dir():
            raise DataError(
                f"the {split} image folder does not exist",
                file=folder,
                record=split,
                fix=f"correct {split}: in {path.name}",
            )
    return folders


def read_yolo(root: Path, report: IngestReport) -> SourceDataset:
    """Parse a YOLO dataset folder into records."""
    path, data = load_data_yaml(root)
    names = _names(data, path)
    base = Path(data["path"]) if isinstance(data.get("path"), str) else root
    if not base.is_absolute():
        base = root / base
    if not base.is_dir():
        base = root
    records: list[ImageRecord] = []
    scanned: set[Path] = set()
    for split, folder in _image_folders(base, path, data):
        images = list_images(folder)
        for image in images:
            label = _label_file(image)
            objects = _parse_labels(label, image, names, report) if label.is_file() else []
            records.append(
                ImageRecord(
                    record=f"{split}/{image.stem}" if split else image.stem,
                    name=image.name,
                    file=image,
                    ann_file=label if label.is_file() else image,
                    split=split,
                    key=relative_key(image, base),
                    objects=objects,
                )
            )
        if folder not in scanned:
            scanned.add(folder)
            report_orphan_labels(folder, images, report)
    if not records:
        raise DataError(
            "no images found in the image folders of the YOLO source",
            file=path,
            fix="put the images in the folders the data yaml names (or images/ beside labels/)",
        )
    # masks only when every object has a polygon (Ultralytics reads a mixed folder as boxes only)
    all_objects = [o for rec in records for o in rec.objects]
    any_polygons = bool(all_objects) and all(o.polygons is not None for o in all_objects)
    tasks = ["classification", "detection"] + (
        ["instance_segmentation", "semantic_segmentation"] if any_polygons else []
    )
    return SourceDataset(
        name=root.name.lower(),
        spec=f"yolo:{root}",
        categories=names,
        tasks=tasks,  # type: ignore[arg-type]
        records=records,
    )
