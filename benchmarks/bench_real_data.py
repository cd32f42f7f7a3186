"""Faster R-CNN and YOLO v1 on real images (raccoon, BCCD) with the ImageNet backbone: the issue's figures.

    .venv/bin/python benchmarks/bench_real_data.py [--cases raccoon:faster_rcnn bccd:yolo ...] [--workdir DIR]

Each case is a (dataset, architecture) pair; the dataset names the params file
``configs/detect_<dataset>.yaml``, which holds every knob of the run (image size, epochs, learning
rate, ``trainable_layers``, YOLO's S, the ``augment.detection`` preset). For each case, in this one
process and exactly as ``visionflow ingest`` + ``visionflow detect --params ... --arch ...`` do:

1. ingest the config's ``data.source`` (a folder under ``../shared/data``, read-only) into
   ``<workdir>/data/<dataset>`` with the config's ``data`` section (raccoon: seeded 80/10/10
   split; BCCD: its own ``ImageSets/Main`` train/val/test);
2. ``run_detect`` (train with the shared engine, pick ``best.pt`` on the val split, score the
   held-out test split with the project's evaluator), outputs and MLflow run under ``<workdir>``.

Recorded per case: COCO mAP@0.5 and mAP@[.5:.95], VOC AP@0.5 (all-point), per-class AP@0.5,
the engine's training seconds and the process CPU seconds (user + sys) of the detect run (with
``threads: 1`` this is about what the wall time would be on a quiet machine; the shared CPU makes
wall time noisy), and the config knobs that produced them.

Results are merged into ``benchmarks/results/real_data_detection.json`` by case, so the cases can
be run one at a time (each takes minutes of CPU). Needs ``../shared/data`` beside the repository and
torchvision's mobilenet_v2 ImageNet weights in the torch hub cache (no download happens).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import torch  # noqa: E402

from components.config import Params, TrackingConfig, load_params  # noqa: E402
from components.io import write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "real_data_detection.json"
CASES = ("raccoon:faster_rcnn", "raccoon:yolo", "bccd:faster_rcnn", "bccd:yolo")
# the knobs of an architecture's section worth recording beside its figures
KNOBS = ("image_size", "min_stride", "fpn_channels", "rpn_pre_nms_top_n", "rpn_post_nms_top_n", "box_batch_size_per_image",
         "S", "B", "head", "hidden",
         "lambda_coord", "lambda_noobj", "score_threshold", "nms_iou", "max_detections")


def config_path(dataset: str) -> Path:
    """``configs/detect_<dataset>.yaml`` of the repository."""
    return ROOT / "configs" / f"detect_{dataset}.yaml"


def case_params(dataset: str, workdir: Path) -> Params:
    """The dataset's params file with the dataset and outputs redirected under ``workdir`` (metrics: run in ``workdir/<dataset>``)."""
    source = load_params(config_path(dataset)).data.path
    return load_params(
        config_path(dataset),
        overrides=[
            f"data.path={(ROOT / source).resolve()}",
            f"data.out={workdir / 'data' / dataset}",
            f"detect.out={workdir / 'outputs' / dataset}",
        ],
    )


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_case(dataset: str, arch: str, workdir: Path, tracking: TrackingConfig) -> dict:
    """Ingest (once per dataset) and run the detect stage for one case; its figures and knobs."""
    from components.data.ingest import ingest
    from components.stages.detect import run_detect

    params = case_params(dataset, workdir)
    if not (workdir / "data" / dataset / "dataset.json").is_file():
        ingest(params.data.source, Path(params.data.out), cfg=params.data)
    acfg = params.detect.arch(arch)
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    (workdir / dataset).mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(workdir / dataset):  # the stage writes metrics/detect/<arch>.json there
        metrics = run_detect(params.detect, arch, params.augment, params.evaluate, tracking)
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    test = metrics["test"]
    section = acfg.model_dump(mode="json")
    return {
        "config": str(config_path(dataset).relative_to(ROOT)),
        "command": f"visionflow detect --params configs/detect_{dataset}.yaml --arch {arch}",
        "source": params.data.source,
        "map_50": round(test["map_50"], 4),
        "map": round(test["map"], 4),
        "voc_map_50": round(test["voc_map_50"], 4),
        "per_class_ap_50": {name: round(v["ap_50"], 4) for name, v in test["per_class"].items()},
        "per_class_ap": {name: round(v["ap"], 4) for name, v in test["per_class"].items()},
        "test_images": test["num_images"],
        "ms_per_image": round(test["ms_per_image"], 1),
        "val_map_50_best": round(float(metrics["val"].get("map_50", float("nan"))), 4) if metrics["val"] else None,
        "best_epoch": metrics["best_epoch"],
        "epochs": metrics["epochs"],
        "train_time_s": round(metrics["train_time_s"], 1),
        "process_cpu_s": round(cpu, 1),
        "wall_s": round(wall, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "parameters": metrics["parameters"],
        "backbone": section["backbone"],
        "train": {k: section["train"][k] for k in ("epochs", "batch_size", "optimizer", "lr", "scheduler", "threads")},
        "augment": {
            "detection": section.get("augment") or params.augment.detection,  # the detector's own preset, if set
            "hflip": params.augment.hflip,
            "vflip": params.augment.vflip,
        },
        **{k: section[k] for k in KNOBS if k in section},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="dataset:arch pairs, e.g. bccd:yolo")
    parser.add_argument("--workdir", type=Path, default=None, help="data, outputs and MLflow store (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    os.chdir(ROOT)  # the configs' sources (../shared/data/...) are relative to the repository
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-real-data-"))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking = TrackingConfig(uri=f"sqlite:///{workdir / 'mlflow.db'}", experiment="bench-real-data")
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = dict(previous.get("cases", {}))
    for case in args.cases:
        dataset, arch = case.split(":")
        results[case] = run_case(dataset, arch, workdir, tracking)
        print(case, json.dumps({k: results[case][k] for k in ("map_50", "map", "per_class_ap_50", "process_cpu_s")}))
        report = {
            "benchmark": "Faster R-CNN and YOLO v1 on real images with torchvision's ImageNet mobilenet_v2 backbone",
            "split": "raccoon: held-out 10% of a seeded 80/10/10 split (20 images); bccd: its own test split (72 images)",
            "metrics": "COCO mAP@0.5 and mAP@[.5:.95] of the project's evaluator on the test split; per-class AP@0.5",
            "cases": dict(sorted(results.items())),
            "machine": {
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "platform": platform.platform(),
                "device": "cuda" if torch.cuda.is_available() else "cpu",
            },
            "note": "2-core CPU shared with other jobs; process_cpu_s (user+sys, threads: 1) is the training "
            "cost to compare, wall_s depends on the load. Each case was run on its own with "
            "`--cases dataset:arch`; the figures are from a single seed (0).",
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(report, args.out)  # after every case: a long run keeps what it has
    for case, row in report["cases"].items():
        print(f"{case:22s} mAP@0.5 {row['map_50']:.3f}  mAP {row['map']:.3f}  cpu {row['process_cpu_s']:.0f} s  "
              f"{row['per_class_ap_50']}")
    return report


if __name__ == "__main__":
    main()
