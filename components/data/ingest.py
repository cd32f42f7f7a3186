"""The ingest stage: any source spec -> validated canonical dataset (+ DVC hash, + MLflow lineage).

``visionflow ingest --source SPEC --out DIR [--strict]`` calls :func:`ingest`. SPEC is
``shapes`` (the built-in generator), ``coco:FILE.json`` or ``coco:DIR``, ``voc:DIR``,
``yolo:DIR``, ``imagefolder:DIR`` or ``masks:DIR``; a ``DIR`` may also be a ``.zip``/``.tar``
archive, extracted safely first. Source files are only read, never modified.
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
from components.errors import DataError

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
    """The params that determine the output (recorded in dataset.json; the shapes section only for shapes)."""
    data = cfg.model_dump(mode="json", exclude={"source", "out", "images", "strict"})
    if kind != "shapes":
        data.pop("shapes")
    return data


def _print_summary(manifest: dict[str, Any], report: IngestReport, out: Path) -> None:
    counts = report.counts()
    splits = ", ".join(f"{s} {n}" for s, n in manifest["splits"].items())
    actions = ", ".join(f"{n} {a}" for a, n in counts["by_action"].items()) or "none"
    print(
        f"ingest {manifest['name']}: {splits} images; {sum(manifest['objects'].values())} objects; "
        f"decisions: {actions} (see {out / 'ingest_report.json'})",
        file=sys.stderr,
    )
    for reason, n in counts["by_reason"].items():
        print(f"  {n:5d} x {reason}", file=sys.stderr)


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
        summary: name, out, tasks, categories, splits, objects, report counts, ``dvc_md5``, seconds.

    Raises:
        DataError: unparseable source (both modes), any problem in strict mode, nothing usable left.
    """
    start = time.perf_counter()
    kind, path = parse_spec(source)
    out = Path(out)
    report = IngestReport(strict=strict)
    _check_out_apart(out, [p for p in (path, Path(images) if images else None) if p is not None])
    with opened_source(path) if path is not None else nullcontext(None) as opened:
        parsed = read_source(source, opened, cfg, images, report)
        parsed.spec = source
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
    _print_summary(manifest, report, out)
    summary = {
        "name": manifest["name"],
        "out": str(out),
        "source": source,
        "tasks": manifest["tasks"],
        "categories": manifest["categories"],
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
        logger.log_params({"data": cfg.model_dump(mode="json"), "source": summary["source"], "out": str(out)})
        logger.log_metrics(metrics)
        logger.log_dataset(name=manifest["name"], digest=summary["dvc_md5"], source=str(out), profile=summary)
        logger.log_artifact(out / "dataset.json")
        logger.log_artifact(out / "ingest_report.json")
