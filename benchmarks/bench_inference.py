"""Inference latency: the registered MLflow pyfunc model against the bare torch module, batch 1 and 16.

    .venv/bin/python benchmarks/bench_inference.py [--repeats 20] [--image-size 160]

A classifier checkpoint in the engine's format (``classifier`` on ``mobilenet_v2``, 2 classes, the
finetune stage's 160 px and ImageNet normalisation; random weights, latency does not depend on them)
is logged and registered exactly as the register stage does (``components.tracking.log_pyfunc_model``
+ ``register_version``) in a temporary sqlite MLflow store, then loaded back by ``models:/NAME@candidate``.
Three ways to predict the same PNG images (320x240) are timed:

* **pyfunc**: ``model.predict(DataFrame({"image": [png bytes]}))``: MLflow's input handling, PNG
  decoding, resize + normalisation, forward, softmax, a DataFrame of labels/scores;
* **predictor**: :class:`components.stages.predict.ImagePredictor` on the same bytes (what the pyfunc
  wraps, without MLflow), to split the pyfunc's cost into MLflow's and the pre/post-processing's;
* **bare module**: ``model(x)`` under ``torch.inference_mode`` on an already decoded, resized,
  normalised ``Tensor[B, 3, 160, 160]``.

Reported: median ms per image over ``--repeats`` calls after warm-up. Writes
``benchmarks/results/inference.json``. The CPU is shared with other jobs while measuring.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from components.io import write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "inference.json"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def png_images(n: int, size: tuple[int, int] = (320, 240)) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def median_ms_per_image(call: Callable[[], object], batch: int, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / batch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import pandas as pd

    from components import tracking
    from components.config import TrackingConfig
    from components.engine import load_model, save_checkpoint
    from components.models.registry import get_model
    from components.stages.predict import ImagePredictor, decode_image

    images = png_images(max(args.batches))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        tmp = Path(tmp)
        model_args = {"num_classes": 2, "backbone": "mobilenet_v2", "weights": None}
        torch.manual_seed(0)
        model = get_model("classification", "classifier", **model_args)
        ckpt_path = save_checkpoint(tmp / "best.pt", {
            "task": "classification", "model_name": "classifier", "model_args": model_args, "state_dict": model.state_dict(),
            "categories": ["ants", "bees"], "image_size": args.image_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        })
        cfg = TrackingConfig(uri=f"sqlite:///{tmp / 'mlflow.db'}", experiment="bench-inference", artifact_location=(tmp / "artifacts").as_uri())
        t0 = time.perf_counter()
        with tracking.start_run(cfg, run_name="bench-inference"):
            uri = tracking.log_pyfunc_model(checkpoint=ckpt_path, task="classification", example_images=images[:1],
                                            model_config={"device": "cpu"})
        version = tracking.register_version(uri, "bench-classifier", version_description="benchmark", alias="candidate")
        register_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pyfunc = tracking.load_pyfunc("models:/bench-classifier@candidate", cfg)
        load_s = time.perf_counter() - t0

        predictor = ImagePredictor.from_checkpoint(ckpt_path, device="cpu")
        bare, _ = load_model(ckpt_path)
        bare.eval()
        for batch in args.batches:
            frame = pd.DataFrame({"image": images[:batch]})
            x = torch.stack([predictor._prepare(decode_image(b)) for b in images[:batch]])  # pre-processed once

            def run_bare(x: torch.Tensor = x) -> object:
                with torch.inference_mode():
                    return bare(x)

            timings = {
                "pyfunc": median_ms_per_image(lambda frame=frame: pyfunc.predict(frame), batch, args.repeats),
                "predictor": median_ms_per_image(lambda batch=batch: predictor.predict(images[:batch]), batch, args.repeats),
                "bare_module": median_ms_per_image(run_bare, batch, args.repeats),
            }
            rows.append({"batch": batch, **{f"{k}_ms_per_image": round(v, 3) for k, v in timings.items()},
                         "pyfunc_over_bare": round(timings["pyfunc"] / timings["bare_module"], 2),
                         "pyfunc_minus_predictor_ms_per_image": round(timings["pyfunc"] - timings["predictor"], 3)})

    result = {
        "benchmark": "registered pyfunc vs bare torch module, ms per image",
        "model": f"classifier(mobilenet_v2), 2 classes, {args.image_size} px input, PNG 320x240 inputs",
        "model_version": version,
        "register_seconds": round(register_s, 2),
        "pyfunc_load_seconds": round(load_s, 2),
        "rows": rows,
        "settings": {**vars(args), "out": str(args.out)},
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__, "load_average_1min": round(os.getloadavg()[0], 2)},
        "note": "CPU shared with other jobs while measured; medians of repeated calls after warm-up",
    }
    header = f"{'batch':>5}  {'pyfunc ms/img':>13}  {'predictor ms/img':>16}  {'bare ms/img':>11}  {'pyfunc/bare':>11}"
    print(header)
    for r in rows:
        print(f"{r['batch']:>5}  {r['pyfunc_ms_per_image']:>13.2f}  {r['predictor_ms_per_image']:>16.2f}  {r['bare_module_ms_per_image']:>11.2f}  {r['pyfunc_over_bare']:>11.2f}")
    print(f"register {register_s:.1f} s, pyfunc load {load_s:.1f} s (load average {result['machine']['load_average_1min']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
