"""The R-CNN lineage measured: R-CNN -> Fast R-CNN -> Faster R-CNN on the same test split.

The lecture tells detection's history as a sequence of removed bottlenecks:

* R-CNN extracts CNN features *per proposed region*; Fast R-CNN runs the CNN once per image and
  RoI-pools the regions from the shared feature map ("removes the per-region feature cost");
* both depend on selective search; Faster R-CNN replaces it with a region proposal network on
  the shared features ("removes the selective-search cost and keeps or improves accuracy").

:func:`run_lineage` loads the three detectors trained by the detect stage
(``<detect.out>/<arch>/best.pt``) and times each, one image at a time, on the test split, split
into the same three parts:

* ``proposals``: selective search (R-CNN, Fast R-CNN; computed afresh, not from the cache) or the
  RPN on the shared features (Faster R-CNN);
* ``features``: the CNN: once per region (R-CNN), once per image (Fast R-CNN, Faster R-CNN + FPN);
* ``head``: RoI pooling, classification, box regression, NMS.

It also evaluates each with the project's :class:`~components.metrics.detection.DetectionEvaluator`
(mAP@0.5, mAP@[.5:.95]) and measures the recall of ground-truth boxes at IoU 0.5 and 0.7 against
the number of proposals, for selective search (the detectors' settings and the paper's "fast"
mode) and for the trained RPN, with the time per image of each search, and the CNN + head time of
R-CNN and Fast R-CNN against the number of regions (given proposals). Everything goes to
``metrics/rcnn_lineage.json`` and ``<detect.out>/lineage/rcnn_lineage.png``, with each of the
lecture's claims checked against the figures.

When the detect stage skipped one of the three detectors (a dataset without boxes: its out folder
holds ``SKIPPED.txt``), the lineage is skipped too: ``metrics/rcnn_lineage.json`` = ``{"stage":
"lineage", "status": "skipped", "reason"}`` and ``<detect.out>/lineage/SKIPPED.txt``, exit 0.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from components.config import DetectConfig, SelectiveSearchDetectorConfig
from components.engine import log_line, progress, synchronize
from components.errors import CheckpointError, DataError
from components.ops.selective_search import (
    ProposalCache,
    SelectiveSearchParams,
    proposal_recall,
    selective_search,
)
from components.plots import plot_lineage

LINEAGE = ("rcnn", "fast_rcnn", "faster_rcnn")
METRICS_FILE = Path("metrics/rcnn_lineage.json")
RECALL_COUNTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
SCALING_COUNTS = (10, 50, 100, 200, 500)  # regions per image in the feature-cost sweep
SCALING_IMAGES = 16  # test images in the sweep
PAPER_FAST_MODE = {"scales": (50.0, 100.0), "color_spaces": ("hsv", "lab"), "similarities": ("ctsf", "tsf")}
ACCURACY_TOLERANCE = 0.01  # "keeps" accuracy: within one mAP point


# --------------------------------------------------------------------------- timed inference


def _timed_selective_search_model(
    model: nn.Module, image: Tensor
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """R-CNN / Fast R-CNN: one image; the model records its own part timings in ``last_timings``."""
    detections = model([image])[0]
    return detections, dict(model.last_timings)


def _timed_faster_rcnn(model: nn.Module, image: Tensor) -> tuple[dict[str, Tensor], dict[str, float]]:
    """torchvision's ``GeneralizedRCNN.forward`` in eval, step by step, with the time of each part.

    Returns the same detections as ``model([image])`` (the same calls in the same order).
    """
    device = image.device
    start = time.perf_counter()
    original_size = [(int(image.shape[-2]), int(image.shape[-1]))]
    images, _ = model.transform([image])
    features = model.backbone(images.tensors)
    synchronize(device)
    t_features = time.perf_counter()
    proposals, _ = model.rpn(images, features)
    synchronize(device)
    t_proposals = time.perf_counter()
    detections, _ = model.roi_heads(features, proposals, images.image_sizes)
    detections = model.transform.postprocess(detections, images.image_sizes, original_size)
    synchronize(device)
    end = time.perf_counter()
    return detections[0], {
        "proposals_s": t_proposals - t_features,
        "features_s": t_features - start,
        "head_s": end - t_proposals,
    }


def _rpn_proposals(model: nn.Module, image: Tensor) -> Tensor:
    """The trained RPN's proposals for one image, best objectness first, in the input image's pixels."""
    from torchvision.models.detection.transform import resize_boxes

    images, _ = model.transform([image])
    proposals, _ = model.rpn(images, model.backbone(images.tensors))
    return resize_boxes(proposals[0], images.image_sizes[0], tuple(image.shape[-2:]))


def _timer_for(
    arch: str, model: nn.Module
) -> Callable[[nn.Module, Tensor], tuple[dict[str, Tensor], dict[str, float]]]:
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    if arch == "faster_rcnn":
        if not isinstance(model, GeneralizedRCNN):
            raise CheckpointError(
                f"the faster_rcnn checkpoint holds a {type(model).__name__}, not torchvision's GeneralizedRCNN",
                record=arch,
                fix="retrain it with `visionflow detect --arch faster_rcnn`",
            )
        return _timed_faster_rcnn
    if not hasattr(model, "proposer") or not hasattr(model, "last_timings"):
        raise CheckpointError(
            f"the {arch} checkpoint does not hold a selective-search detector",
            record=arch,
            fix=f"retrain it with `visionflow detect --arch {arch}`",
        )
    # time the search itself: a fresh in-memory cache, so every test image is searched once, here
    model.proposer.cache = ProposalCache(None, model.proposer.params)
    return _timed_selective_search_model


@torch.no_grad()
def measure_detector(
    arch: str,
    model: nn.Module,
    images: Sequence[Tensor],
    targets: Sequence[dict[str, Any]],
    categories: Sequence[str],
    device: torch.device,
) -> dict[str, Any]:
    """Per-image time of each part (milliseconds, mean over the images) and COCO/VOC accuracy of one detector.

    Args:
        arch: ``rcnn``, ``fast_rcnn`` or ``faster_rcnn``.
        model: the detector in eval mode on ``device``.
        images: the test images, ``Tensor[3, H, W]`` in [0, 1], run one at a time.
        targets: their ground truth ``{boxes, labels, ...}``.
        categories: class names of labels 1..K.
        device: where the model runs.

    Returns:
        ``{proposals_ms, features_ms, head_ms, total_ms, map_50, map, voc_map_50, num_images}``.
    """
    from components.metrics.detection import DetectionEvaluator

    timed = _timer_for(arch, model)
    timed(model, images[0].to(device))  # warm-up (allocator, lazy initialisation); not counted
    if hasattr(model, "proposer"):
        model.proposer.cache = ProposalCache(None, model.proposer.params)
    evaluator = DetectionEvaluator(list(categories))
    parts = {"proposals_s": 0.0, "features_s": 0.0, "head_s": 0.0}
    total = 0.0
    for image, target in progress(list(zip(images, targets, strict=True)), desc=f"lineage {arch}", unit="img"):
        image = image.to(device)
        synchronize(device)
        start = time.perf_counter()
        detections, timing = timed(model, image)
        synchronize(device)
        total += time.perf_counter() - start
        for key in parts:
            parts[key] += timing[key]
        evaluator.update([{k: v.cpu() for k, v in detections.items()}], [target])
    n = len(images)
    result = evaluator.compute()["bbox"]
    log_line(f"lineage {arch}: {n} test images, {1000 * total / n:.1f} ms/image, mAP@0.5 {float(result['map_50']):.4f}")
    return {
        "proposals_ms": 1000 * parts["proposals_s"] / n,
        "features_ms": 1000 * parts["features_s"] / n,
        "head_ms": 1000 * parts["head_s"] / n,
        "total_ms": 1000 * total / n,
        "map_50": float(result["map_50"]),
        "map": float(result["map"]),
        "voc_map_50": float(result["voc"]["map_50"]),
        "num_images": n,
    }


# --------------------------------------------------------------------------- proposals


def search_params(
    section: SelectiveSearchDetectorConfig, *, max_proposals: int | None
) -> SelectiveSearchParams:
    """The selective-search settings of a detector's params section."""
    return SelectiveSearchParams(
        scales=tuple(section.ss_scales),
        sigma=section.ss_sigma,
        min_size=section.ss_min_size,
        color_spaces=tuple(section.ss_color_spaces),
        similarities=tuple(section.ss_similarities),
        max_proposals=max_proposals,
    )


def measure_proposals(
    name: str,
    propose: Callable[[Tensor], Tensor],
    images: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    counts: Sequence[int] = RECALL_COUNTS,
) -> tuple[dict[str, Any], list[Tensor]]:
    """Recall of the ground-truth boxes at IoU 0.5 / 0.7 against the number of proposals, and time per image.

    Args:
        name: label of the proposal method (for the progress bar).
        propose: ``image -> Tensor[N, 4]`` ranked proposals in the image's pixels.
        images: ``Tensor[3, H, W]`` in [0, 1].
        gt_boxes: per image ``Tensor[G, 4]`` xyxy pixels.
        counts: numbers of proposals at which recall is measured.

    Returns:
        ``({counts, recall_50, recall_70, ms_per_image, mean_proposals}, the proposals per image)``.
    """
    proposals, seconds = [], 0.0
    for image in progress(images, desc=f"proposals {name}", unit="img"):
        start = time.perf_counter()
        proposals.append(propose(image).cpu())
        seconds += time.perf_counter() - start
    log_line(f"proposals {name}: {len(images)} images, {1000 * seconds / max(1, len(images)):.1f} ms/image")
    recall = proposal_recall(proposals, [b.cpu() for b in gt_boxes], counts, (0.5, 0.7))
    summary = {
        "counts": list(counts),
        "recall_50": recall[0.5],
        "recall_70": recall[0.7],
        "ms_per_image": 1000 * seconds / len(images),
        "mean_proposals": sum(len(p) for p in proposals) / len(proposals),
    }
    return summary, proposals


class _FixedProposals:
    """Stands in for a detector's selective search: hands out the boxes set for the next image."""

    def __init__(self) -> None:
        self.boxes = torch.zeros(0, 4)

    def __call__(self, images: Sequence[Tensor]) -> list[Tensor]:
        return [self.boxes.to(images[0].device) for _ in images]


@torch.no_grad()
def feature_cost_vs_regions(
    models: dict[str, nn.Module],
    images: Sequence[Tensor],
    proposals: Sequence[Tensor],
    counts: Sequence[int] = SCALING_COUNTS,
) -> dict[str, dict[str, list[float]]]:
    """CNN + head time per image against the number of regions, proposals given (their search not counted).

    R-CNN runs the CNN once per region, so its cost grows with the count; Fast R-CNN runs it once
    per image and only RoI pooling and the heads grow.

    Args:
        models: ``{arch: detector}`` with a ``proposer`` and ``last_timings`` (R-CNN, Fast R-CNN).
        images: test images on the models' device.
        proposals: per image, ranked proposals; the first ``n`` are used (fewer where an image has fewer).
        counts: the numbers of regions ``n``.

    Returns:
        ``{arch: {counts, regions (mean regions actually used), ms_per_image}}``.
    """
    out: dict[str, dict[str, list[float]]] = {}
    for arch, model in models.items():
        original, fixed = model.proposer, _FixedProposals()
        model.proposer = fixed
        try:
            ms, regions = [], []
            for n in counts:
                seconds, used = 0.0, 0
                for image, boxes in zip(images, proposals, strict=True):
                    fixed.boxes = boxes[:n]
                    used += len(fixed.boxes)
                    model([image])
                    seconds += model.last_timings["features_s"] + model.last_timings["head_s"]
                ms.append(1000 * seconds / len(images))
                regions.append(used / len(images))
        finally:
            model.proposer = original
        out[arch] = {"counts": list(counts), "regions": regions, "ms_per_image": ms}
    return out


# --------------------------------------------------------------------------- claims


def check_claims(
    detectors: dict[str, dict[str, Any]], scaling: dict[str, dict[str, list[float]]] | None = None
) -> list[dict[str, Any]]:
    """The lecture's claims against the measured figures, each with ``holds`` and the numbers behind it.

    Args:
        detectors: :func:`measure_detector`'s rows for ``rcnn``, ``fast_rcnn`` and ``faster_rcnn``.
        scaling: :func:`feature_cost_vs_regions`' result, quoted as further evidence when given.
    """
    rc, fast, faster = detectors["rcnn"], detectors["fast_rcnn"], detectors["faster_rcnn"]
    growth = ""
    if scaling:
        growth = "; CNN + heads from {} to {} regions: ".format(
            round(scaling["rcnn"]["regions"][0]), round(scaling["rcnn"]["regions"][-1])
        ) + ", ".join(
            f"{arch} {row['ms_per_image'][0]:.1f} -> {row['ms_per_image'][-1]:.1f} ms"
            for arch, row in scaling.items()
        )
    per_region = rc["features_ms"] + rc["head_ms"]
    shared = fast["features_ms"] + fast["head_ms"]
    d50, dmap = faster["map_50"] - fast["map_50"], faster["map"] - fast["map"]
    return [
        {
            "claim": "Fast R-CNN removes R-CNN's per-region feature cost",
            "holds": shared < per_region,
            "evidence": f"CNN + heads per image: R-CNN {per_region:.1f} ms, Fast R-CNN {shared:.1f} ms "
            f"({per_region / max(shared, 1e-9):.1f}x faster); proposals unchanged ({rc['proposals_ms']:.1f} vs {fast['proposals_ms']:.1f} ms)"
            + growth,
        },
        {
            "claim": "Faster R-CNN removes the selective-search cost",
            "holds": faster["proposals_ms"] < fast["proposals_ms"],
            "evidence": f"proposals per image: selective search {fast['proposals_ms']:.1f} ms, RPN {faster['proposals_ms']:.1f} ms "
            f"({fast['proposals_ms'] / max(faster['proposals_ms'], 1e-9):.1f}x); total {fast['total_ms']:.1f} -> {faster['total_ms']:.1f} ms",
        },
        {
            "claim": "Faster R-CNN keeps or improves Fast R-CNN's accuracy",
            "holds": d50 >= -ACCURACY_TOLERANCE and dmap >= -ACCURACY_TOLERANCE,
            "evidence": f"mAP@0.5 {fast['map_50']:.3f} -> {faster['map_50']:.3f} ({d50:+.3f}), "
            f"mAP@[.5:.95] {fast['map']:.3f} -> {faster['map']:.3f} ({dmap:+.3f}); tolerance {ACCURACY_TOLERANCE}",
        },
    ]


# --------------------------------------------------------------------------- outputs


def _load_detector(cfg: DetectConfig, arch: str, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    from components.engine import load_model

    path = Path(cfg.out) / arch / "best.pt"
    if not path.exists():
        raise CheckpointError(
            f"no trained {arch} detector", file=path, fix=f"run `visionflow detect --arch {arch}` first"
        )
    model, ckpt = load_model(path, map_location="cpu")
    return model.to(device).eval(), ckpt


def run_lineage(
    cfg: DetectConfig, *, metrics_file: str | Path = METRICS_FILE, limit: int | None = None
) -> dict[str, Any]:
    """Measure the lineage on ``cfg.dataset``'s test split; write ``metrics_file`` and ``<cfg.out>/lineage/rcnn_lineage.png``.

    Args:
        cfg: the ``detect`` params (dataset, out folder, the rcnn/fast_rcnn/faster_rcnn sections).
        metrics_file: where the JSON goes (DVC metrics).
        limit: measure only the first ``limit`` test images (quick runs).

    Returns:
        ``{dataset, split, num_images, device, detectors: {arch: {...}}, proposals: {method: {...}}, claims: [...]}``.

        Or ``{"stage": "lineage", "status": "skipped", "reason"}`` when the detect stage skipped
        one of the three detectors (the data has no boxes).

    Raises:
        CheckpointError: a detector of the lineage has not been trained by the detect stage.
        DataError: the dataset has no test split with detection labels.
    """
    from components.engine import prepare_out_dir, resolve_device
    from components.io import write_json

    reason = read_lineage_skip_reason(cfg)
    if reason is not None:
        return write_lineage_skipped(cfg, reason, Path(metrics_file))
    prepare_out_dir(Path(cfg.out) / "lineage", resume=False)

    device = resolve_device(cfg.faster_rcnn.train.device)
    classes, images, targets = read_test_split(cfg, limit)
    n = len(images)
    detectors: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {}
    for arch in LINEAGE:
        model, ckpt = _load_detector(cfg, arch, device)
        categories = ckpt.get("categories") or classes
        detectors[arch] = measure_detector(arch, model, images, targets, categories, device)
        models[arch] = model

    proposals, fast_mode_boxes = measure_all_proposals(cfg, images, [t["boxes"] for t in targets], models["faster_rcnn"], device)
    m = min(SCALING_IMAGES, n)
    scaling = feature_cost_vs_regions(
        {arch: models[arch] for arch in ("rcnn", "fast_rcnn")},
        [im.to(device) for im in images[:m]],
        fast_mode_boxes[:m],
    )

    result: dict[str, Any] = {
        "dataset": str(cfg.dataset),
        "split": "test",
        "num_images": n,
        "device": _describe_device(device),
        "timing": "batch of 1 image, mean over the test images after one warm-up image; selective search searched afresh (no cache)",
        "detectors": detectors,
        "proposals": proposals,
        "feature_cost_vs_regions": scaling,
        "claims": check_claims(detectors, scaling),
    }
    plot = plot_lineage(result, Path(cfg.out) / "lineage" / "rcnn_lineage.png")
    result["plot"] = str(plot)
    write_json(_finite(result), Path(metrics_file))
    return result


def read_lineage_skip_reason(cfg: DetectConfig) -> str | None:
    """Why the lineage cannot run (a detector absent from the params or skipped by the detect stage), or None."""
    from components.engine import read_skipped

    skipped = {arch: r for arch in LINEAGE if (r := read_skipped(Path(cfg.out) / arch)) is not None}
    absent = [arch for arch in LINEAGE if arch not in cfg.architectures]
    if not (skipped or absent):
        return None
    return "; ".join(
        ([f"detect.architectures lacks {', '.join(absent)} (the lineage compares all three)"] if absent else [])
        + [f"detect skipped {arch} ({r})" for arch, r in skipped.items()]
    )


def write_lineage_skipped(cfg: DetectConfig, reason: str, metrics_file: Path) -> dict[str, Any]:
    """Write ``<cfg.out>/lineage/SKIPPED.txt`` and the skipped metrics file, so DVC still finds both outs."""
    from components.engine import write_skipped
    from components.io import write_json

    write_skipped(Path(cfg.out) / "lineage", reason)
    result = {"stage": "lineage", "status": "skipped", "reason": reason}
    write_json(result, metrics_file)
    log_line(f"lineage: skipped, {reason}")
    return result


def read_test_split(
    cfg: DetectConfig, limit: int | None
) -> tuple[list[str], list[Tensor], list[dict[str, Tensor]]]:
    """``(classes, images, targets)`` of the first ``limit`` (default all) test images, in the metrics' target contract.

    Raises:
        DataError: the test split is empty.
    """
    from components.data.datasets import DetectionDataset

    dataset = DetectionDataset(cfg.dataset, "test")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise DataError(
            "the test split is empty",
            file=cfg.dataset,
            record="test",
            fix="ingest a dataset with a test split",
        )
    samples = [dataset[i] for i in range(n)]
    images = [torch.as_tensor(img).as_subclass(Tensor) for img, _ in samples]
    targets = [
        {
            "boxes": t["boxes"].as_subclass(Tensor),
            "labels": t["labels"],
            "iscrowd": t["iscrowd"],
            "area": t["area"],
        }
        for _, t in samples
    ]
    return dataset.classes, images, targets


def measure_all_proposals(
    cfg: DetectConfig, images: list[Tensor], gt_boxes: list[Tensor], faster: nn.Module, device: torch.device
) -> tuple[dict[str, dict[str, Any]], list[Tensor]]:
    """Recall and time of every proposal method: selective search (params, paper's fast mode) and the trained RPN.

    Returns:
        ``({method: summary}, the fast mode's boxes per image)``: those boxes feed the
        feature-cost sweep. ``detect.fast_rcnn``'s search is measured only when it differs from
        ``detect.rcnn``'s.
    """
    cap = max(RECALL_COUNTS)
    own = search_params(cfg.rcnn, max_proposals=cap)
    fast_mode = SelectiveSearchParams(
        **PAPER_FAST_MODE, sigma=cfg.rcnn.ss_sigma, min_size=cfg.rcnn.ss_min_size, max_proposals=cap
    )
    fast_mode_summary, fast_mode_boxes = measure_proposals(
        "ss fast mode", lambda im: selective_search(im, fast_mode), images, gt_boxes
    )
    proposals = {
        "selective search (detect.rcnn params)": measure_proposals(
            "ss params", lambda im: selective_search(im, own), images, gt_boxes
        )[0],
        "selective search (paper's fast mode)": fast_mode_summary,
        "RPN (trained Faster R-CNN)": measure_proposals(
            "rpn", lambda im: _rpn_proposals(faster, im.to(device)), images, gt_boxes
        )[0],
    }
    if cfg.fast_rcnn.model_dump(include=_SEARCH_KEYS) != cfg.rcnn.model_dump(include=_SEARCH_KEYS):
        fast_own = search_params(cfg.fast_rcnn, max_proposals=cap)
        proposals["selective search (detect.fast_rcnn params)"] = measure_proposals(
            "ss fast_rcnn", lambda im: selective_search(im, fast_own), images, gt_boxes
        )[0]
    return proposals, fast_mode_boxes


_SEARCH_KEYS = {
    "proposals_per_image",
    "ss_scales",
    "ss_sigma",
    "ss_min_size",
    "ss_color_spaces",
    "ss_similarities",
}


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _finite(value: Any) -> Any:
    """NaN (e.g. recall with no ground truth) becomes null in the JSON file."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
