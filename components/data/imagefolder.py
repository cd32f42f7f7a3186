"""ImageFolder reader: ``DIR/<split>/<class>/<image>`` (splits ``train``, ``val``/``valid``, ``test``)
or ``DIR/<class>/<image>`` (then a seeded split from each image's path ``<class>/<image>``, stable
as the folder grows). Classes are the folder names, sorted.

Only the classification view is written; each image's bytes are copied as they are. Files that
are not JPEG or PNG (hymenoptera's ``imageNotFound.gif``) are reported by the canonical writer.
"""

from __future__ import annotations

from pathlib import Path

from components.data.records import IMAGE_SUFFIXES, ImageRecord, SourceDataset, natural_key
from components.data.validation import IngestReport
from components.errors import DataError

SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=natural_key)


def read_imagefolder(root: Path, report: IngestReport) -> SourceDataset:
    """Parse an ImageFolder tree into classification records."""
    if not root.is_dir():
        raise DataError(
            "ImageFolder source is not a folder",
            file=root,
            fix="point imagefolder: at a folder of class folders",
        )
    top = _subdirs(root)
    split_dirs = [(SPLIT_FOLDERS[d.name.lower()], d) for d in top if d.name.lower() in SPLIT_FOLDERS]
    groups = split_dirs if split_dirs else [(None, root)]
    records: list[ImageRecord] = []
    classes: set[str] = set()
    for split, folder in groups:
        for class_dir in _subdirs(folder):
            classes.add(class_dir.name)
            for path in sorted(
                (p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith(".")),
                key=natural_key,
            ):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    report.add(
                        path,
                        f"{class_dir.name}/{path.name}",
                        f"not an image file (suffix {path.suffix or 'none'})",
                        "skipped",
                        kind="not an image",
                    )
                    continue
                record = (
                    f"{folder.name}/{class_dir.name}/{path.name}"
                    if split
                    else f"{class_dir.name}/{path.name}"
                )
                records.append(
                    ImageRecord(
                        record=record,
                        name=path.name,
                        file=path,
                        split=split,
                        key=record,
                        label=class_dir.name,
                    )
                )
    if len(classes) < 1 or not records:
        raise DataError(
            "no class folders with images found",
            file=root,
            fix="lay the images out as DIR/<split>/<class>/<image> or DIR/<class>/<image>",
        )
    return SourceDataset(
        name=root.name.lower(),
        spec=f"imagefolder:{root}",
        categories=sorted(classes, key=natural_key),
        tasks=["classification"],
        records=records,
    )
