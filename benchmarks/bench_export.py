"""ONNX export: onnxruntime against torch eager and the registered pyfunc, ms per image at batch 1 and 16.

    .venv/bin/python benchmarks/bench_export.py [--repeats 5] [--threads 2]

Four models, in one run: the classifier (``classifier`` on ``mobilenet_v2``, 160 px, ImageNet
normalisation), YOLO v1, Faster R-CNN and FCN. Each comes from its stage checkpoint when the main
job left one (``outputs/finetune/fine_tuning/best.pt``, ``outputs/detect/{yolo,faster_rcnn}/best.pt``,
``outputs/segment/fcn/best.pt``), else it is built untrained from ``params.yaml``'s architecture
(``detector_arguments`` / ``build_segmenter``; the ``source`` field of each row says which).
Latency depends on the weights only through the number of detections that reach NMS.

Every path starts from the same PNG bytes (320x240 shapes-like images) and returns the same records:

* **onnxruntime**: Pillow decode + :class:`components.export.onnx_runtime.OnnxPredictor` (numpy
  resize, the exported graph, numpy post-processing); CPUExecutionProvider with ``--threads``
  intra-op threads;
* **torch eager**: :class:`components.stages.predict.ImagePredictor` (``torch.set_num_threads(--threads)``);
* **pyfunc**: the model logged as the register stage does (``tracking.log_pyfunc_model``) in a
  temporary sqlite store, loaded with ``mlflow.pyfunc.load_model``, ``predict(DataFrame({"image": png bytes}))``.

Reported: median ms per image over ``--repeats`` calls after two warm-ups, the export time of each, and
``export_seconds_every_model``: ``export_onnx`` of every exportable model of ``params.yaml``'s
default architectures (untrained), i.e. what ONNX export adds to the register stage.
Writes ``benchmarks/results/export.json`` with the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_inference import IMAGENET_MEAN, IMAGENET_STD, median_ms_per_image  # noqa: E402  (this script's folder is on sys.path)
from PIL import Image  # noqa: E402

from components.io import write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "export.json"
CHECKPOINTS = {
    "classifier": "outputs/finetune/fine_tuning/best.pt",
    "yolo": "outputs/detect/yolo/best.pt",
    "faster_rcnn": "outputs/detect/faster_rcnn/best.pt",
    "fcn": "outputs/segment/fcn/best.pt",
}


def png_images(n: int, size: tuple[int, int] = (320, 240)) -> list[bytes]:
    """Shapes-like test images: a grey noisy background with a red square and a blue disc at random places."""
    rng = np.random.default_rng(0)
    w, h = size
    out = []
    for _ in range(n):
        img = rng.integers(60, 140, (h, w, 3), dtype=np.uint8)
        x, y, s = int(rng.integers(0, w - 80)), int(rng.integers(0, h - 80)), int(rng.integers(30, 80))
        img[y : y + s, x : x + s] = (220, 40, 40)
        yy, xx = np.mgrid[:h, :w]
        cx, cy, r = rng.integers(40, w - 40), rng.integers(40, h - 40), rng.integers(15, 40)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = (40, 60, 220)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def build_checkpoints(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each benchmarked model's checkpoint: the stage's when present, else untrained from params.yaml's architecture."""
    from components.config import load_params
    from components.engine import save_checkpoint
    from components.models import get_model
    from components.stages.detect import detector_arguments
    from components.stages.segment import build_segmenter

    params = load_params(ROOT / "params.yaml", [])
    cats = ["circle", "square", "triangle"]
    out: dict[str, tuple[Path, str]] = {}
    for key, rel in CHECKPOINTS.items():
        if (ROOT / rel).is_file():
            out[key] = (ROOT / rel, f"stage checkpoint {rel}")
            continue
        torch.manual_seed(0)
        if key == "classifier":
            ref = params.finetune.imagenet_backbone
            args = {"num_classes": 2, "backbone": ref.arch, "weights": None}
            model, extra = get_model("classification", "classifier", **args), {"image_size": params.finetune.image_size,
                                                                              "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
            task, cats_k = "classification", ["ants", "bees"]
        elif key == "fcn":
            acfg = params.segment.fcn
            model, args = build_segmenter("fcn", acfg, len(cats))
            args = {"num_classes": len(cats), **args}
            task, cats_k, extra = "segmentation", cats, {"image_size": acfg.image_size}
        else:
            acfg = getattr(params.detect, key)
            args = detector_arguments(key, acfg, len(cats))
            model = get_model("detection", key, **args)
            task, cats_k, extra = "detection", cats, {"image_size": acfg.image_size}
        path = save_checkpoint(folder / f"{key}.pt", {"task": task, "model_name": key, "model_args": args,
                                                       "state_dict": model.state_dict(), "categories": cats_k, **extra})
        out[key] = (path, f"untrained, params.yaml architecture ({args.get('backbone') or args.get('backbone_arch') or ''})")
    return out


def time_every_export(folder: Path) -> dict[str, float]:
    """Seconds of ``export_onnx`` for every exportable model of params.yaml's default architectures (what register adds)."""
    from components.config import load_params
    from components.engine import save_checkpoint
    from components.export.onnx_export import export_onnx
    from components.models import get_model
    from components.stages.detect import detector_arguments
    from components.stages.segment import build_segmenter

    params = load_params(ROOT / "params.yaml", [])
    cats = ["circle", "square", "triangle"]
    jobs: list[tuple[str, str, dict]] = [
        ("backbone", params.finetune.imagenet_backbone.arch, {}),
        ("classification", "classifier", {"num_classes": 2, "backbone": params.finetune.imagenet_backbone.arch, "weights": None}),
    ]
    jobs += [("detection", a, detector_arguments(a, getattr(params.detect, a), len(cats))) for a in params.detect.architectures]
    jobs += [("segmentation", a, {"num_classes": len(cats), **build_segmenter(a, getattr(params.segment, a), len(cats))[1]})
             for a in params.segment.architectures]
    sizes = {a: getattr(params.detect, a).image_size for a in params.detect.architectures}
    sizes.update({a: getattr(params.segment, a).image_size for a in params.segment.architectures})
    seconds: dict[str, float] = {}
    for task, name, args in jobs:
        torch.manual_seed(0)
        model = get_model(task, name, **args)
        size = sizes.get(name, params.finetune.image_size)
        path = save_checkpoint(folder / f"all_{name}.pt", {"task": task, "model_name": name, "model_args": args,
                                                            "state_dict": model.state_dict(), "categories": cats, "image_size": size})
        seconds[name] = round(export_onnx(path, folder / "all").seconds, 2)
        print(f"export {name:16s} {seconds[name]:6.1f} s", flush=True)
    seconds["total"] = round(sum(seconds.values()), 2)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    load_before = os.getloadavg()

    import onnxruntime as ort
    import pandas as pd

    from components import tracking
    from components.config import TrackingConfig
    from components.export.onnx_export import export_onnx
    from components.export.onnx_runtime import OnnxPredictor
    from components.stages.predict import ImagePredictor

    images = png_images(max(args.batches))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        tmp = Path(tmp)
        cfg = TrackingConfig(uri=f"sqlite:///{tmp / 'mlflow.db'}", experiment="bench-export", artifact_location=(tmp / "artifacts").as_uri())
        for key, (ckpt_path, source) in build_checkpoints(tmp).items():
            exported = export_onnx(ckpt_path, tmp / "onnx")
            onnx_predictor = OnnxPredictor(exported.path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.log_severity_level = 3
            onnx_predictor.session = ort.InferenceSession(str(exported.path), sess_options=options, providers=["CPUExecutionProvider"])
            eager = ImagePredictor.from_checkpoint(ckpt_path, device="cpu")
            with tracking.start_run(cfg, run_name=f"bench-export-{key}"):
                uri = tracking.log_pyfunc_model(checkpoint=ckpt_path, task=eager.task, example_images=images[:1], model_config={"device": "cpu"},
                                                instance=False)
            pyfunc = tracking.load_pyfunc(uri, cfg)
            for batch in args.batches:
                blobs = images[:batch]
                frame = pd.DataFrame({"image": blobs})

                def run_onnx(blobs: list[bytes] = blobs, predictor: OnnxPredictor = onnx_predictor) -> object:
                    return predictor.predict([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])

                def run_eager(blobs: list[bytes] = blobs, predictor: ImagePredictor = eager, batch: int = batch) -> object:
                    return predictor.predict(blobs, batch_size=batch)

                def run_pyfunc(frame: pd.DataFrame = frame, model: object = pyfunc) -> object:
                    return model.predict(frame)  # type: ignore[attr-defined]

                timings = {
                    "onnxruntime": median_ms_per_image(run_onnx, batch, args.repeats),
                    "torch_eager": median_ms_per_image(run_eager, batch, args.repeats),
                    "pyfunc": median_ms_per_image(run_pyfunc, batch, args.repeats),
                }
                row = {"model": key, "batch": batch, **{f"{k}_ms_per_image": round(v, 2) for k, v in timings.items()},
                       "torch_over_onnx": round(timings["torch_eager"] / timings["onnxruntime"], 2),
                       "graph_batch": onnx_predictor.meta["batch"], "export_seconds": round(exported.seconds, 2), "source": source}
                rows.append(row)
                print(f"{key:12s} batch {batch:>2}: onnxruntime {row['onnxruntime_ms_per_image']:8.2f}  torch {row['torch_eager_ms_per_image']:8.2f}  "
                      f"pyfunc {row['pyfunc_ms_per_image']:8.2f} ms/image  (export {exported.seconds:.1f} s)", flush=True)
        every_export = time_every_export(tmp)
    result = {
        "benchmark": "onnxruntime vs torch eager (ImagePredictor) vs pyfunc, ms per image from PNG bytes to records",
        "export_seconds_every_model": every_export,
        "images": "PNG 320x240, shapes-like (benchmarks/bench_export.py png_images)",
        "rows": rows,
        "settings": {**vars(args), "out": str(args.out)},
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__, "onnxruntime": ort.__version__,
                    "load_average_1min_before": round(load_before[0], 2), "load_average_1min_after": round(os.getloadavg()[0], 2)},
        "note": "CPU shared with other jobs while measured (see the load averages); medians of repeated calls after two warm-ups",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
