"""Plots a person would rather look at than numbers: PR curves, confusion matrices, and DVC plot files.

A flat module of functions, each writing one file atomically (temp file + rename). PNGs use
matplotlib's Agg backend (no display needed); matplotlib is imported inside the functions so
that importing this module stays cheap (``visionflow evaluate`` imports it lazily too). The
DVC writers produce files that ``dvc plots show`` renders with its stock templates:
``linear`` for the PR-curve CSVs (x = ``recall``, one y column per class) and ``confusion`` for
the records ``[{"actual", "predicted"}]``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return _atomic_write_bytes(path, buf.getvalue())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_json(data: Any, path: Path) -> Path:
    """Write ``data`` as indented JSON, atomically (NaN written as null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and x != x:
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        return x

    return _atomic_write_bytes(path, (json.dumps(clean(data), indent=2) + "\n").encode())


def plot_pr_curves(curves: Sequence[dict[str, Any]], path: Path, *, title: str = "Precision-recall") -> Path:
    """One panel per IoU threshold, one line per class (with its AP in the legend).

    Args:
        curves: records ``{"class", "iou", "recall": [R], "precision": [R]}`` (e.g.
            ``DetectionEvaluator.pr_curves()``); precision -1 points are dropped.
        path: the PNG to write.
        title: the figure's title.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    ious = sorted({float(c["iou"]) for c in curves}) or [0.5]
    fig, axes = plt.subplots(1, len(ious), figsize=(5.2 * len(ious), 4.6), squeeze=False)
    for ax, iou in zip(axes[0], ious, strict=True):
        group = [c for c in curves if float(c["iou"]) == iou]
        aps = []
        for c in group:
            r = np.asarray(c["recall"], dtype=float)
            p = np.asarray(c["precision"], dtype=float)
            ok = p >= 0
            ap = float(p[ok].mean()) if ok.any() else float("nan")
            aps.append(ap)
            ax.plot(r[ok], p[ok], lw=1.5, label=f"{c['class']} (AP {ap:.3f})")
        if aps:
            ax.set_title(f"IoU {iou:.2f}: mAP {np.nanmean(aps):.3f}")
        else:
            ax.set_title(f"IoU {iou:.2f}: no ground truth")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.grid(alpha=0.3)
        if group:
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(title)
    return _save_figure(fig, path)


def write_dvc_pr_curves(curves: Sequence[dict[str, Any]], out_dir: Path, *, prefix: str = "pr") -> list[Path]:
    """PR curves as DVC ``linear`` plot CSVs: one file per IoU threshold, ``recall`` then one column per class.

    ``dvc.yaml``: ``plots: [{<out_dir>/pr_iou50.csv: {x: recall, y: [<classes>]}}]`` (or
    ``dvc plots show <file> -x recall``).

    Returns:
        The written paths, e.g. ``[out_dir/pr_iou50.csv, out_dir/pr_iou75.csv]``.
    """
    written = []
    for iou in sorted({float(c["iou"]) for c in curves}):
        group = [c for c in curves if float(c["iou"]) == iou]
        recall = group[0]["recall"]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["recall", *[c["class"] for c in group]])
        for i, r in enumerate(recall):
            w.writerow([f"{r:.4f}", *[f"{max(c['precision'][i], 0.0):.6f}" for c in group]])
        path = Path(out_dir) / f"{prefix}_iou{round(iou * 100):02d}.csv"
        written.append(_atomic_write_bytes(path, buf.getvalue().encode()))
    return written


def plot_confusion_matrix(
    matrix: np.ndarray,
    labels: Sequence[str],
    path: Path,
    *,
    normalize: bool = True,
    title: str = "Confusion matrix",
    xlabel: str = "predicted",
    ylabel: str = "true",
) -> Path:
    """A confusion matrix as a heat map with counts (and row-normalised colours when ``normalize``).

    Args:
        matrix (ndarray[C, C]): rows true, columns predicted (detection: last row/column background).
        labels: the C class names.
        path: the PNG to write.
        normalize: colour by the fraction of each true class (row), annotate with counts.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    m = np.asarray(matrix, dtype=float)
    rows = m.sum(axis=1, keepdims=True)
    colour = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0) if normalize else m
    n = len(labels)
    size = max(4.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(colour, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7, color="white" if colour[i, j] > 0.5 * (colour.max() or 1) else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
    ax.set_title(title)
    return _save_figure(fig, path)


def write_dvc_confusion(matrix: np.ndarray, labels: Sequence[str], path: Path) -> Path:
    """A confusion matrix as DVC ``confusion`` template records ``[{"actual", "predicted"}]`` (one per count).

    ``dvc.yaml``: ``plots: [{<path>: {template: confusion, x: predicted, y: actual}}]``.
    """
    m = np.asarray(matrix, dtype=np.int64)
    records = [
        {"actual": labels[i], "predicted": labels[j]} for i in range(m.shape[0]) for j in range(m.shape[1]) for _ in range(int(m[i, j]))
    ]
    return write_json(records, path)
