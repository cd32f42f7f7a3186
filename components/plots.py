"""Plots a person would rather look at than numbers: PR curves, confusion matrices, and DVC plot files.

A flat module of functions, each writing one file atomically (temp file + rename). PNGs use
matplotlib's Agg backend (no display needed); matplotlib is imported inside the functions so
that importing this module stays cheap (``visionflow evaluate`` imports it lazily too). The
DVC writers produce files that ``dvc plots show`` renders with its stock templates:
``linear`` for the PR-curve CSVs (x = ``recall``, one y column per class) and ``confusion`` for
the records ``[{"actual", "predicted"}]``.

The files land in DVC-cached out folders, so they are functions of their inputs: PNGs carry no
metadata (no matplotlib version, no date: :data:`PNG_METADATA`) and the plots of a stage's own
folder show no timings (those change from run to run; they belong to ``metrics/*.json``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from components.io import (  # write_json: re-exported for flows/torchrun_stage.py
    atomic_write_bytes,
    write_json,
)

if TYPE_CHECKING:
    import torch

#: ``savefig(metadata=...)`` for every PNG: no "Software" text chunk, so the bytes depend on the figure alone
PNG_METADATA: dict[str, Any] = {"Software": None}


def _save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata=PNG_METADATA)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


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
        written.append(atomic_write_bytes(path, buf.getvalue().encode()))
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
                    ax.text(
                        j,
                        i,
                        f"{int(m[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if colour[i, j] > 0.5 * (colour.max() or 1) else "black",
                    )
    fig.colorbar(
        im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count"
    )
    ax.set_title(title)
    return _save_figure(fig, path)


def write_dvc_confusion(matrix: np.ndarray, labels: Sequence[str], path: Path) -> Path:
    """A confusion matrix as DVC ``confusion`` template records ``[{"actual", "predicted"}]`` (one per count).

    ``dvc.yaml``: ``plots: [{<path>: {template: confusion, x: predicted, y: actual}}]``.
    """
    m = np.asarray(matrix, dtype=np.int64)
    records = [
        {"actual": labels[i], "predicted": labels[j]}
        for i in range(m.shape[0])
        for j in range(m.shape[1])
        for _ in range(int(m[i, j]))
    ]
    return write_json(records, path)


# --------------------------------------------------------------------------- detection (detect and lineage stages)


def draw_detections(
    model: torch.nn.Module,
    dataset: Any,
    device: torch.device,
    *,
    categories: list[str],
    path: Path,
    count: int = 8,
    score_threshold: float = 0.3,
    extra: int = 2,
    title: str = "",
) -> Path:
    """A grid PNG of the first ``count`` test images: true boxes in white, predictions in class colours.

    Drawn per image: every prediction with score >= ``score_threshold``, and at least the
    ``n_true + extra`` highest-scoring ones whatever their score (each box is labelled with its
    score). A fixed threshold alone hides a detector whose scores are calibrated lower (YOLO's
    class-specific confidence ``c * p`` is trained towards the IoU) although its ranking, which is
    what mAP measures, is good.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from torchvision.utils import draw_bounding_boxes

    with torch.no_grad():  # inference only: no graph
        model.eval()
        n = min(count, len(dataset))
        cols = min(4, n)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.4), squeeze=False)
        palette = plt.get_cmap("tab10")
        for i in range(rows * cols):
            ax = axes[i // cols][i % cols]
            ax.axis("off")
            if i >= n:
                continue
            image, target = dataset[i]
            image = image.as_subclass(torch.Tensor)
            (det,) = model([image.to(device)])
            gt_boxes = target["boxes"].as_subclass(torch.Tensor)
            scores_all = det["scores"].cpu()
            keep = scores_all >= score_threshold
            keep[scores_all.argsort(descending=True)[: len(gt_boxes) + extra]] = True
            pixels = (image.clamp(0, 1) * 255).to(torch.uint8)
            if len(gt_boxes):
                pixels = draw_bounding_boxes(pixels, gt_boxes, colors="white", width=1)
            boxes, labels, scores = det["boxes"].cpu()[keep], det["labels"].cpu()[keep], det["scores"].cpu()[keep]
            if len(boxes):
                names = [f"{categories[int(k) - 1]} {s:.2f}" for k, s in zip(labels, scores, strict=True)]
                colors = [tuple(int(255 * c) for c in palette((int(k) - 1) % 10)[:3]) for k in labels]
                pixels = draw_bounding_boxes(pixels, boxes, labels=names, colors=colors, width=2)
            ax.imshow(pixels.permute(1, 2, 0).numpy())
        fig.suptitle(title or "white: ground truth; coloured: predictions", fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, metadata=PNG_METADATA)
        plt.close(fig)
    return path


def plot_detector_comparison(
    table: Mapping[str, Mapping[str, Any]], path: Path, *, skipped: Mapping[str, str] | None = None
) -> Path:
    """Five bar panels (mAP@0.5, mAP@[.5:.95], ms/image, parameters, train time), bars coloured by kind.

    ``skipped`` (``{arch: reason}``) is named in a caption under the panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(table)
    colors = {
        "one-stage": "tab:blue",
        "two-stage": "tab:orange",
        "window classifier": "tab:gray",
        "other": "tab:green",
    }
    panels = [
        ("map_50", "mAP@0.5", 1.0),
        ("map", "mAP@[.5:.95]", 1.0),
        ("ms_per_image", "inference ms / image", 1.0),
        ("parameters", "parameters (M)", 1e-6),
        ("train_time_s", "training time (s)", 1.0),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.8))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        values = [float(table[a].get(key) or 0.0) * scale for a in archs]
        ax.bar(
            range(len(archs)),
            values,
            color=[colors.get(table[a].get("kind", "other"), "tab:green") for a in archs],
        )
        ax.set_xticks(range(len(archs)), archs, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), loc="upper right", fontsize=7)
    caption = skipped_caption(dict(skipped or {}))
    if caption:
        fig.text(0.01, 0.005, caption, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.04 if caption else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata=PNG_METADATA)
    plt.close(fig)
    return path


def plot_lineage(result: dict[str, Any], path: Path) -> Path:
    """Recall vs number of proposals (IoU 0.5 and 0.7), time per image by part, and accuracy, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(25, 4.6))
    for ax, key, iou in ((axes[0], "recall_50", 0.5), (axes[1], "recall_70", 0.7)):
        for name, rec in result["proposals"].items():
            ax.plot(
                rec["counts"], rec[key], marker="o", ms=3, label=f"{name} ({rec['ms_per_image']:.0f} ms/img)"
            )
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("number of proposals per image")
        ax.set_ylabel(f"recall of GT boxes at IoU {iou}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    archs = list(result["detectors"])
    bottom = [0.0] * len(archs)
    for part, colour in (
        ("proposals_ms", "tab:orange"),
        ("features_ms", "tab:blue"),
        ("head_ms", "tab:green"),
    ):
        values = [result["detectors"][a][part] for a in archs]
        axes[2].bar(archs, values, bottom=bottom, color=colour, label=part.replace("_ms", ""))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes[2].set_ylabel(f"ms per image ({result['device']})")
    axes[2].set_title("time per image by part")
    axes[2].legend(fontsize=8)
    for arch, row in result.get("feature_cost_vs_regions", {}).items():
        axes[3].plot(row["regions"], row["ms_per_image"], marker="o", label=arch)
    axes[3].set_xlabel("regions per image (proposals given)")
    axes[3].set_ylabel("CNN + heads, ms per image")
    axes[3].set_title("per-region cost")
    axes[3].grid(alpha=0.3)
    axes[3].legend(fontsize=8)
    width = 0.38
    xs = range(len(archs))
    axes[4].bar(
        [x - width / 2 for x in xs], [result["detectors"][a]["map_50"] for a in archs], width, label="mAP@0.5"
    )
    axes[4].bar(
        [x + width / 2 for x in xs],
        [result["detectors"][a]["map"] for a in archs],
        width,
        label="mAP@[.5:.95]",
    )
    axes[4].set_xticks(list(xs), archs)
    axes[4].set_ylim(0, 1)
    axes[4].set_title(f"test split ({result['num_images']} images)")
    axes[4].legend(fontsize=8)
    fig.suptitle("R-CNN -> Fast R-CNN -> Faster R-CNN: where the time goes")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- segmentation (segment stage)


def segmentation_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """One RGB colour per class index 0..num_classes-1 (matplotlib's tab10/tab20; index 0, background, unused)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_classes <= 11 else "tab20"]
    return [tuple(int(255 * c) for c in cmap((k - 1) % cmap.N)[:3]) for k in range(num_classes)]


def overlay_class_map(image: Any, class_map: Any, num_classes: int, *, ignore_index: int = 255, alpha: float = 0.55) -> Any:
    """Draw a class-index map on an image with ``torchvision.utils.draw_segmentation_masks``.

    Args:
        image: Tensor[3, H, W] float in [0, 1] (or uint8).
        class_map: Tensor[H, W] int, 0 background (not drawn), k category k, ``ignore_index`` drawn white.
        num_classes: K + 1, for the palette.

    Returns:
        Tensor[3, H, W] uint8.
    """
    import torch
    from torchvision.utils import draw_segmentation_masks

    img = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
    palette = segmentation_palette(num_classes)
    classes = [k for k in range(1, num_classes) if (class_map == k).any()]
    masks = [class_map == k for k in classes]
    colors = [palette[k] for k in classes]
    if (class_map == ignore_index).any():
        masks.append(class_map == ignore_index)
        colors.append((255, 255, 255))
    if not masks:
        return img
    return draw_segmentation_masks(img, torch.stack(masks).bool(), alpha=alpha, colors=colors)


def plot_segmentation_overlays(
    images: Any, true_masks: Any, pred_masks: Any, class_names: Sequence[str], path: Path, *, ignore_index: int = 255, title: str = ""
) -> Path:
    """A grid of test images: the image, its true mask and the predicted mask drawn on it (one column per image).

    Args:
        images: Tensor[N, 3, H, W] in [0, 1].
        true_masks, pred_masks: Tensor[N, H, W] class indices (0 background, ``ignore_index`` ignored).
        class_names: names of classes 0..K (0 = background), for the legend.
        path: the PNG to write.
    """
    from matplotlib.patches import Patch

    plt = _pyplot()

    n, k = len(images), len(class_names)
    fig, axes = plt.subplots(3, n, figsize=(2.0 * n + 0.5, 6.6), squeeze=False)
    rows = [("image", None), ("true", true_masks), ("predicted", pred_masks)]
    for i in range(n):
        for r, (label, maps) in enumerate(rows):
            shown = images[i] if maps is None else overlay_class_map(images[i], maps[i], k, ignore_index=ignore_index)
            shown = shown.float() / 255 if shown.dtype != images.dtype else shown
            axes[r, i].imshow(shown.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            axes[r, i].set_xticks([])
            axes[r, i].set_yticks([])
            if i == 0:
                axes[r, i].set_ylabel(label)
    palette = segmentation_palette(k)
    handles = [Patch(color=[c / 255 for c in palette[j]], label=class_names[j]) for j in range(1, k)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97 if title else 1))
    return _save_figure(fig, Path(path), dpi=100)


def plot_skipped(skipped: dict[str, str], path: Path, *, title: str) -> Path:
    """A text-only PNG listing the architectures that were skipped and why (a comparison with nothing to compare)."""
    plt = _pyplot()
    lines = [f"{arch}: skipped, {reason}" for arch, reason in skipped.items()] or ["nothing to compare"]
    fig = plt.figure(figsize=(9, 0.6 + 0.35 * len(lines)))
    fig.text(0.02, 0.98, title, fontsize=11, va="top", weight="bold")
    for i, line in enumerate(lines):
        fig.text(0.02, 0.98 - (i + 1.5) / (len(lines) + 2), line, fontsize=9, va="top")
    return _save_figure(fig, Path(path), dpi=100)


def skipped_caption(skipped: dict[str, str] | None) -> str:
    """``"skipped: unet (reason); ..."`` for a comparison figure's caption, or ``""``."""
    return "skipped: " + "; ".join(f"{a} ({r})" for a, r in skipped.items()) if skipped else ""


def plot_segmenter_comparison(table: dict[str, dict[str, Any]], path: Path, *, skipped: dict[str, str] | None = None) -> Path:
    """Bars of mIoU, pixel accuracy, ms per image and parameters per architecture, and per-class IoU.

    Args:
        table: ``{arch: {miou, pixel_accuracy, ms_per_image, parameters, per_class_iou: {name: iou}}}``.
        path: the PNG to write.
        skipped: ``{arch: reason}`` of architectures the data could not feed (named in a caption;
            a figure listing them alone when ``table`` is empty).
    """
    if not table:
        return plot_skipped(skipped or {}, path, title="segmentation: no architecture could run on this dataset")
    plt = _pyplot()
    archs = list(table)
    panels = [("miou", "mean IoU"), ("pixel_accuracy", "pixel accuracy"), ("ms_per_image", "ms / image"), ("parameters", "parameters (M)")]
    fig = plt.figure(figsize=(13, 7))
    grid = fig.add_gridspec(2, len(panels))
    for j, (key, label) in enumerate(panels):
        ax = fig.add_subplot(grid[0, j])
        values = [float(table[a].get(key) or 0.0) / (1e6 if key == "parameters" else 1.0) for a in archs]
        bars = ax.bar(archs, values, color=[f"C{i}" for i in range(len(archs))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(label)
        if key in ("miou", "pixel_accuracy"):
            ax.set_ylim(0, 1.05)
    ax = fig.add_subplot(grid[1, :])
    names = sorted({n for a in archs for n in (table[a].get("per_class_iou") or {})}, key=lambda n: (n != "background", n))
    width = 0.8 / max(1, len(archs))
    x = np.arange(len(names))
    for i, arch in enumerate(archs):
        per_class = table[arch].get("per_class_iou") or {}
        ax.bar(x + i * width, [float(per_class.get(n) or 0.0) for n in names], width, label=arch, color=f"C{i}")
    ax.set_xticks(x + width * (len(archs) - 1) / 2, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("IoU (test)")
    ax.legend()
    caption = skipped_caption(skipped)
    if caption:
        fig.text(0.01, 0.005, caption, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.03 if caption else 0, 1, 1))
    return _save_figure(fig, Path(path), dpi=100)


# --------------------------------------------------------------------------- classification (pretrain / finetune stages)


def plot_training_curves(history: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Per-epoch loss (train, val) and validation accuracy / macro F1 of one engine run.

    Args:
        history: ``FitResult.history``: ``{"epoch", "train_loss", "train_accuracy", "val": {"loss", "accuracy", "macro_f1"}}``.
        path: the PNG to write.
    """
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    val = [h.get("val") or {} for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [h.get("train_loss") for h in history], "o-", label="train")
    if val and "loss" in val[0]:
        ax_loss.plot(epochs, [v["loss"] for v in val], "s-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    for key, style in (("accuracy", "o-"), ("macro_f1", "s--")):
        if val and key in val[0]:
            ax_acc.plot(epochs, [v[key] for v in val], style, label=f"val {key}")
    if history and "train_accuracy" in history[0]:
        ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "^:", label="train accuracy")
    ax_acc.set(xlabel="epoch", ylim=(0, 1.02), title="accuracy")
    ax_acc.legend(loc="lower right", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, Path(path), dpi=110)


def plot_strategy_comparison(rows: dict[str, dict[str, Any]], path: Path, *, labels: dict[str, str] | None = None, title: str = "") -> Path:
    """Bars of validation accuracy and macro F1 per transfer-learning strategy, the accuracy above each pair.

    The training times are left to ``metrics/finetune.json``: the PNG lives in the stage's
    DVC-cached out folder and must be the same file when the stage runs again.

    Args:
        rows: ``{strategy: {"accuracy", "macro_f1"}}`` (``metrics/finetune.json``'s ``strategies``).
        path: the PNG to write.
        labels: display names of the strategies.
    """
    plt = _pyplot()
    names = list(rows)
    x = np.arange(len(names))
    acc = [float(rows[n].get("accuracy") or 0.0) for n in names]
    f1 = [float(rows[n].get("macro_f1") or 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(1.9 * len(names) + 2, 4))
    ax.bar(x - 0.18, acc, 0.36, label="accuracy")
    ax.bar(x + 0.18, f1, 0.36, label="macro F1")
    for i in range(len(names)):
        ax.text(i, max(acc[i], f1[i]) + 0.02, f"{acc[i]:.3f} / {f1[i]:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [(labels or {}).get(n, n).replace(", ", ",\n") for n in names], fontsize=8)
    ax.set(ylim=(0, 1.15), ylabel="validation score", title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, Path(path), dpi=110)
