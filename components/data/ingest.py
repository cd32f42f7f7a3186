"""The ingest stage: any source spec -> validated canonical dataset (+ DVC hash, + MLflow lineage).

``visionflow ingest --source SPEC --out DIR [--strict]`` calls :func:`ingest`. SPEC is
``shapes`` (the built-in generator), ``coco:FILE.json`` or ``coco:DIR``, ``voc:DIR``,
``yolo:DIR``, ``imagefolder:DIR`` or ``masks:DIR``; a ``DIR`` may also be a ``.zip``/``.tar``
archive, extracted safely first. Source files are only read, never modified.

Category ids are the source's own order (COCO ids, the YOLO ``names`` index, sorted names for
VOC/ImageFolder), or ``data.classes`` when set; objects of another class are then reported.
When ``DIR`` already holds a dataset, the returned summary says which classes were added or
removed (``classes_changed``), so a scheduled retraining can surface it.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from components.config import DataConfig, TrackingConfig
from components.data.archives import opened_source
from components.data.canonical import write_canonical
from components.data.records import SourceDataset
from components.data.validation import IngestReport
from components.data.versioning import dvc_directory_md5
from components.errors import ConfigError, DataError
from components.io import read_json

SOURCE_KINDS = ("shapes", "coco", "voc", "yolo", "imagefolder", "masks")


def read_source(
    spec: str, path: Path | None, cfg: DataConfig, images: str | None, report: IngestReport
) -> SourceDataset:
    """Parse a source into format-neutral records (dispatch on the spec's kind)."""
    kind = spec.partition(":")[0]
    if kind == "shapes":
        from components.data.shapes import build_shapes

        return build_shapes(cfg.shapes, seed=cfg.seed)
    assert path is not None
    if kind == "coco":
        from components.data.coco import read_coco

        return read_coco(path, Path(images) if images else None, report)
    if kind == "voc":
        from components.data.voc import read_voc

        return read_voc(path, report)
    if kind == "yolo":
        from components.data.yolo import read_yolo

        return read_yolo(path, report)
    if kind == "imagefolder":
        from components.data.imagefolder import read_imagefolder

        return read_imagefolder(path, report)
    from components.data.masks import read_masks

    return read_masks(path, report, category=cfg.masks_category, foreground=cfg.masks_foreground)


def parse_spec(source: str) -> tuple[str, Path | None]:
    """Split ``kind:path`` and check both parts.

    Raises:
        DataError: unknown kind, missing path, or a path that does not exist.
    """
    kind, sep, arg = source.partition(":")
    if kind not in SOURCE_KINDS or (kind != "shapes" and not arg) or (kind == "shapes" and sep):
        raise DataError(
            f"unknown source spec {source!r}",
            record="--source",
            fix="use shapes, coco:FILE.json, voc:DIR, yolo:DIR, imagefolder:DIR or masks:DIR",
        )
    if kind == "shapes":
        return kind, None
    path = Path(arg).expanduser()
    if not path.exists():
        raise DataError(
            "source not found", file=path, record="--source", fix="check the path after the colon"
        )
    return kind, path


def _check_out_apart(out: Path, sources: list[Path]) -> None:
    """Refuse an output folder that would replace or sit inside the source (source files are never modified).

    Raises:
        DataError: ``out`` is a source path, one of its ancestors, or inside a source folder.
    """
    target = out.resolve()
    for src in sources:
        src = src.resolve()
        if src.is_relative_to(target) or (src.is_dir() and target.is_relative_to(src)):
            raise DataError(
                "the output folder overlaps the source",
                file=out,
                record="--out",
                fix="write the dataset elsewhere: source files are never modified",
            )


def _params_record(kind: str, cfg: DataConfig) -> dict[str, Any]:
    """The params that determine the output (recorded in dataset.json; the shapes section only for shapes).

    The source (``format``, ``path``) is left out: ``dataset.json["source"]`` names it without its
    folders, since a run-scoped flow makes ``path`` absolute and the folder's hash must not depend
    on where the source lies (nor on ``data.format`` when another source is ingested).
    """
    data = cfg.model_dump(mode="json", exclude={"source", "format", "path", "out", "images", "strict"})
    if kind != "shapes":
        data.pop("shapes")
    return data


def apply_classes(parsed: SourceDataset, classes: list[str] | None) -> None:
    """Make ``data.classes`` (when set) the category list, in its order (ids 1..K).

    Raises:
        ConfigError: an empty list, an empty name or a name listed twice.
    """
    if classes is None:
        return
    seen: set[str] = set()
    twice = [c for c in classes if c in seen or seen.add(c)]  # type: ignore[func-returns-value]
    if not classes or twice or not all(c.strip() for c in classes):
        raise ConfigError(
            f"data.classes must list each class name once: {classes!r}",
            record="data.classes",
            fix="list every class name once, in the id order to keep, or set data.classes: null",
        )
    parsed.categories = list(classes)
    parsed.classes_from_params = True


def previous_categories(out: Path) -> list[str] | None:
    """The categories of the dataset already at ``out`` (None: none there, or unreadable)."""
    try:
        manifest = read_json(out / "dataset.json")
    except (OSError, ValueError):
        return None
    cats = manifest.get("categories") if isinstance(manifest, dict) else None
    return [str(c) for c in cats] if isinstance(cats, list) else None


def classes_changed(previous: list[str] | None, current: list[str]) -> dict[str, list[str]]:
    """``{added, removed}`` class names since the previous ingest (both empty when there was none)."""
    if previous is None:
        return {"added": [], "removed": []}
    return {
        "added": [c for c in current if c not in previous],
        "removed": [c for c in previous if c not in current],
    }


def _print_summary(
    manifest: dict[str, Any], report: IngestReport, out: Path, changed: dict[str, list[str]]
) -> None:
    counts = report.counts()
    splits = ", ".join(f"{s} {n}" for s, n in manifest["splits"].items())
    actions = ", ".join(f"{n} {a}" for a, n in counts["by_action"].items()) or "none"
    print(
        f"ingest {manifest['name']}: {splits} images; {sum(manifest['objects'].values())} objects; "
        f"decisions: {actions} (see {out / 'ingest_report.json'})",
        file=sys.stderr,
    )
    for kind, n in counts["by_kind"].items():
        print(f"  {n:5d} x {kind}", file=sys.stderr)
    if changed["added"] or changed["removed"]:
        print(
            f"  classes changed since the previous ingest: added {changed['added']}, removed {changed['removed']}",
            file=sys.stderr,
        )


def ingest(
    source: str,
    out: Path,
    *,
    cfg: DataConfig,
    images: str | None = None,
    strict: bool = False,
    tracking: TrackingConfig | None = None,
) -> dict[str, Any]:
    """Convert ``source`` to the canonical layout at ``out``, validating every record.

    Args:
        source: the source spec (see the module docstring).
        out: dataset folder, replaced atomically.
        cfg: the ``data`` params (seed, split fractions, shapes sizes, duplicate IoU, masks rules).
        images: images folder for ``coco:`` sources (default ``images/`` beside the JSON).
        strict: fail on the first problem (exit 2) instead of repairing/skipping it.
        tracking: when given, log statistics and the dataset (digest = DVC hash) to MLflow.

    Returns:
        summary: name, out, tasks, categories, ``classes_changed`` ``{added, removed}`` (against the
        dataset ``out`` held before; empty lists when there was none or nothing changed), splits,
        objects, report counts, ``dvc_md5``, seconds. ``classes_changed`` and the timing stay out of
        the dataset folder: its bytes depend on the source and the params only.

    Raises:
        DataError: unparseable source (both modes), any problem in strict mode, nothing usable left.
        ConfigError: ``data.classes`` lists a name twice.
    """
    start = time.perf_counter()
    kind, path = parse_spec(source)
    out = Path(out)
    report = IngestReport(strict=strict)
    _check_out_apart(out, [p for p in (path, Path(images) if images else None) if p is not None])
    previous = previous_categories(out)
    with opened_source(path) if path is not None else nullcontext(None) as opened:
        if opened is not None:  # the report names files relative to the source, never absolute
            report.roots.append((opened if opened.is_dir() else opened.parent, ""))
            if images:
                report.roots.append((Path(images), "<images>/"))
        parsed = read_source(source, opened, cfg, images, report)
        parsed.spec = source
        apply_classes(parsed, cfg.classes)
        manifest = write_canonical(
            parsed,
            out,
            report=report,
            split=cfg.split,
            seed=cfg.seed,
            duplicate_iou=cfg.duplicate_iou,
            params=_params_record(kind, cfg),
        )
    digest = dvc_directory_md5(out)
    seconds = time.perf_counter() - start
    changed = classes_changed(previous, manifest["categories"])
    _print_summary(manifest, report, out, changed)
    summary = {
        "name": manifest["name"],
        "out": str(out),
        "source": source,
        "tasks": manifest["tasks"],
        "categories": manifest["categories"],
        "classes_changed": changed,
        "splits": manifest["splits"],
        "objects": manifest["objects"],
        "objects_per_category": manifest["objects_per_category"],
        "report": report.counts(),
        "dvc_md5": digest,
        "seconds": round(seconds, 3),
    }
    if tracking is not None:
        _log_to_mlflow(summary, manifest, cfg, out, tracking)
    return summary


def _log_to_mlflow(
    summary: dict[str, Any], manifest: dict[str, Any], cfg: DataConfig, out: Path, tracking: TrackingConfig
) -> None:
    """Dataset statistics as metrics, the params, the report as artifact, and the dataset input (DVC digest)."""
    from components.tracking import start_run

    metrics: dict[str, float] = {f"images_{s}": n for s, n in manifest["splits"].items()}
    metrics.update({f"objects_{s}": n for s, n in manifest["objects"].items()})
    metrics.update({f"objects_per_category.{c}": n for c, n in manifest["objects_per_category"].items()})
    metrics.update({f"report.{a}": n for a, n in summary["report"]["by_action"].items()})
    metrics["report.total"] = summary["report"]["total"]
    metrics["ingest_seconds"] = summary["seconds"]
    with start_run(
        tracking,
        run_name=f"ingest-{manifest['name']}",
        tags={"stage": "ingest", "dataset": manifest["name"], "dvc_md5": summary["dvc_md5"]},
    ) as logger:
        logger.log_params(
            {
                "data": cfg.model_dump(mode="json"),
                "source": summary["source"],
                "out": str(out),
                "classes_changed": summary["classes_changed"],
            }
        )
        logger.log_metrics(metrics)
        logger.log_dataset(name=manifest["name"], digest=summary["dvc_md5"], source=str(out), profile=summary)
        logger.log_artifact(out / "dataset.json")
        logger.log_artifact(out / "ingest_report.json")
