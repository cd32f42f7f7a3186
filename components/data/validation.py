"""Record-level validation of source datasets and the per-record ingest report.

Every check here decides one thing about one record (an image, an annotation, a mask) and
writes that decision to the :class:`IngestReport` as ``{file, record, kind, reason, action}``:
``repaired`` (e.g. a box clipped to the image), ``skipped`` (unusable) or ``kept`` (worth
knowing, nothing changed). In strict mode the first problem raises :class:`DataError`
naming the file and the record instead, so nothing is written. The report's counts group the
decisions by ``kind``, a fixed text per kind of problem, never by the values of one record.

The checks are plain functions over plain values so that every source format (COCO, VOC,
YOLO, ImageFolder, masks, the shapes generator) is validated by the same code.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.errors import DataError
from components.io import read_json

Action = Literal["repaired", "skipped", "kept"]

#: Image formats the canonical layout stores as they are (``images/<split>/<file>`` holds source bytes).
ACCEPTED_FORMATS = ("JPEG", "PNG")


@dataclass
class Decision:
    """One line of ``ingest_report.json``: what was wrong with which record and what was done.

    ``kind`` is a fixed text per kind of problem (``"box outside the image"``, ``"duplicate box"``,
    ``"label without image"``...) that the report's counts group by; ``reason`` is the full
    text with this record's values.
    """

    file: str
    record: str
    kind: str
    reason: str
    action: Action

    def as_dict(self) -> dict[str, str]:
        return {
            "file": self.file,
            "record": self.record,
            "kind": self.kind,
            "reason": self.reason,
            "action": self.action,
        }


@dataclass
class IngestReport:
    """Collects every decision of one ingest; strict mode turns the first one into a :class:`DataError`.

    Args:
        strict: raise on the first problem instead of repairing or skipping.
        roots: ``[(folder, prefix)]``: a reported file under ``folder`` is written as ``prefix`` +
            its path relative to it, so ``ingest_report.json`` holds no absolute path (the dataset
            folder is a DVC out whose hash must not depend on where the source lies). Strict-mode
            errors keep the full path: they are for the user, not for the dataset.
    """

    strict: bool = False
    decisions: list[Decision] = field(default_factory=list)
    roots: list[tuple[Path, str]] = field(default_factory=list)

    def add(
        self,
        file: object,
        record: object,
        reason: str,
        action: Action,
        *,
        kind: str,
        fix: str | None = None,
    ) -> None:
        """Record a decision, or raise :class:`DataError` in strict mode.

        Args:
            file: the file concerned (the image, the annotation file).
            record: the record inside it.
            reason: what is wrong, with this record's values.
            action: what was done about it.
            kind: the fixed kind of problem the counts group by (no values in it).
            fix: what the user should do, for strict mode's error.

        Raises:
            DataError: in strict mode, naming ``file`` and ``record``.
        """
        if self.strict:
            raise DataError(
                reason,
                file=file,
                record=record,
                fix=fix or f"correct the record, or ingest without --strict to have it {action} and reported",
            )
        self.decisions.append(Decision(self.display(file), str(record), kind, reason, action))

    def display(self, file: object) -> str:
        """``file`` as the report writes it: relative to the first root holding it (see ``roots``)."""
        if isinstance(file, Path):
            for root, prefix in self.roots:
                try:
                    return prefix + file.relative_to(root).as_posix()
                except ValueError:
                    continue
            if self.roots:
                return file.name  # outside every root: the name only, never an absolute path
        return str(file)

    def counts(self) -> dict[str, Any]:
        """Counts by action and by problem kind (:attr:`Decision.kind`)."""
        by_action = Counter(d.action for d in self.decisions)
        by_kind = Counter(d.kind for d in self.decisions)
        return {
            "total": len(self.decisions),
            "by_action": dict(sorted(by_action.items())),
            "by_kind": dict(sorted(by_kind.items())),
        }

    def as_dict(self) -> dict[str, Any]:
        return {"counts": self.counts(), "decisions": [d.as_dict() for d in self.decisions]}


# --------------------------------------------------------------------------- files


def load_json(path: Path, *, fix: str) -> Any:
    """Parse a JSON file; a syntax or encoding error becomes :class:`DataError` with its position.

    Raises:
        DataError: not UTF-8, or not valid JSON (``record`` = line and column).
    """
    try:
        return read_json(path)
    except json.JSONDecodeError as err:
        raise DataError(
            f"not valid JSON: {err.msg}",
            file=path,
            record=f"line {err.lineno}, column {err.colno} (char {err.pos})",
            fix=fix,
        ) from None
    except UnicodeDecodeError as err:
        raise DataError(
            f"not UTF-8 text: {err.reason}", file=path, record=f"byte {err.start}", fix=fix
        ) from None


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageCheck:
    """Outcome of :func:`check_image`: the decoded size and format, or why the file is unusable."""

    width: int = 0
    height: int = 0
    format: str | None = None
    problem: str | None = None
    kind: str | None = None


def check_image(path: Path) -> ImageCheck:
    """Fully decode an image file to find missing, unreadable, truncated or unsupported files.

    Decoding every pixel (not only the header) is what finds truncated JPEGs; it costs a few
    milliseconds per image and is the only way to know the file is usable for training.
    """
    if not path.is_file():
        return ImageCheck(problem="missing image file", kind="missing image")
    try:
        with Image.open(path) as img:
            fmt = img.format
            img.load()
            width, height = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return ImageCheck(problem=f"unreadable or truncated image: {err}", kind="unreadable image")
    if fmt not in ACCEPTED_FORMATS:
        return ImageCheck(
            width,
            height,
            fmt,
            problem=f"not a JPEG or PNG image: the file is {fmt}",
            kind="not a JPEG or PNG",
        )
    if width < 1 or height < 1:
        return ImageCheck(width, height, fmt, problem="image has no pixels", kind="image has no pixels")
    return ImageCheck(width, height, fmt)


# --------------------------------------------------------------------------- boxes


@dataclass(frozen=True)
class BoxCheck:
    """Outcome of :func:`check_box`: the usable xyxy box (clipped if needed) and what was wrong."""

    box: tuple[float, float, float, float] | None
    problem: str | None = None
    repaired: bool = False
    kind: str | None = None


def check_box(box: Sequence[Any] | None, width: int, height: int) -> BoxCheck:
    """Validate one xyxy pixel box against its image: NaN, zero/negative size, outside the image.

    A box that sticks out of the image is clipped (repaired); one with no finite coordinates,
    no area, or nothing inside the image is unusable.

    Args:
        box: ``(x_min, y_min, x_max, y_max)`` in pixels, as the source gave it.
        width: image width in pixels.
        height: image height in pixels.
    """
    if box is None or len(box) != 4:
        return BoxCheck(None, "malformed box: expected 4 numbers", kind="malformed box")
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return BoxCheck(None, f"malformed box: {list(box)!r} is not numeric", kind="malformed box")
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return BoxCheck(None, f"NaN or infinite box coordinate: {[x0, y0, x1, y1]}", kind="non-finite box")
    if x1 <= x0 or y1 <= y0:
        return BoxCheck(None, f"zero or negative box size: {[x0, y0, x1, y1]}", kind="zero-size box")
    cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    if cx1 <= cx0 or cy1 <= cy0:
        return BoxCheck(
            None,
            f"box entirely outside the {width}x{height} image: {[x0, y0, x1, y1]}",
            kind="box entirely outside the image",
        )
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        return BoxCheck(
            (cx0, cy0, cx1, cy1),
            f"box outside the {width}x{height} image: {[x0, y0, x1, y1]}",
            True,
            kind="box outside the image",
        )
    return BoxCheck((x0, y0, x1, y1))


# --------------------------------------------------------------------------- segmentation


def check_polygons(segmentation: Any) -> tuple[list[list[float]], list[str]]:
    """Keep the well-formed parts of a COCO polygon list.

    A polygon is a flat list ``[x1, y1, x2, y2, ...]`` of at least 3 finite points.

    Returns:
        (valid polygons, one problem text per malformed part).
    """
    if not isinstance(segmentation, list):
        return [], [f"malformed polygon: expected a list of polygons, got {type(segmentation).__name__}"]
    valid: list[list[float]] = []
    problems: list[str] = []
    for i, poly in enumerate(segmentation):
        if not isinstance(poly, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly
        ):
            problems.append(f"malformed polygon {i}: not a flat list of numbers")
        elif len(poly) % 2 or len(poly) < 6:
            problems.append(f"malformed polygon {i}: {len(poly)} coordinates (need an even number >= 6)")
        elif not all(math.isfinite(v) for v in poly):
            problems.append(f"malformed polygon {i}: NaN or infinite coordinate")
        else:
            valid.append([float(v) for v in poly])
    return valid, problems


def check_mask_size(mask: np.ndarray, width: int, height: int) -> str | None:
    """The problem text when a mask's ``(H, W)`` differs from its image's, else None."""
    if mask.shape[:2] != (height, width):
        return f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's {width}x{height}"
    return None
