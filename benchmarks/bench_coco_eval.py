"""Time COCO bbox evaluation: visionflow's evaluator vs pycocotools vs faster-coco-eval, same files, same numbers.

The workload imitates a detector's validation run: ``--images`` images (5,000), ``--classes``
categories (20), Poisson(``--gt``) ground-truth boxes per image (7) of assorted sizes (small,
medium and large all present) and ``--dets`` scored detections per image (100): about half near
a ground-truth box (jittered, 90 % with its class), the rest anywhere. Ground truth and results
are written as COCO JSON files, then each tool runs in its own Python process (a fresh
interpreter, so imports count) that loads the two files, evaluates and prints the 12 numbers.

Reported per tool: ``process_s`` (the whole process as the user waits for it: interpreter start,
imports, JSON loading, evaluation), ``load_s`` (the tool's loading of the files: ``COCO()`` +
``loadRes`` / ``load_coco_evaluator``), ``eval_s`` (evaluation alone: ``evaluate + accumulate +
summarize`` / ``compute``), the peak resident memory of the process, and the largest difference
of its 12 numbers from pycocotools'. Results go to ``benchmarks/results/coco_eval.json``.

Run from the repository root::

    .venv/bin/python benchmarks/bench_coco_eval.py                 # the full workload (pycocotools takes minutes)
    .venv/bin/python benchmarks/bench_coco_eval.py --images 500    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from components.io import write_json

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("visionflow", "faster_coco_eval", "pycocotools")


def build_workload(
    n_images: int, n_classes: int, gt_per_image: float, dets_per_image: int, seed: int
) -> tuple[dict, list]:
    """A COCO ground truth and results list of the requested size (seeded, deterministic)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    W, H = 640, 480
    images = [
        {"id": i + 1, "width": W, "height": H, "file_name": f"{i + 1:06d}.jpg"} for i in range(n_images)
    ]
    categories = [{"id": k + 1, "name": f"class_{k + 1}"} for k in range(n_classes)]
    anns, results = [], []
    for img in range(1, n_images + 1):
        ng = int(rng.poisson(gt_per_image))
        side = np.exp(rng.uniform(np.log(8), np.log(300), (ng, 2)))  # log-uniform sizes: small, medium, large
        xy = rng.uniform(0, 1, (ng, 2)) * np.maximum([W, H] - side, 1)
        g = np.c_[xy, side]
        gc = rng.integers(1, n_classes + 1, ng)
        crowd = rng.random(ng) < 0.01
        for b, c, cr in zip(g, gc, crowd, strict=True):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img,
                    "category_id": int(c),
                    "bbox": [round(float(v), 2) for v in b],
                    "area": float(round(b[2], 2) * round(b[3], 2)),
                    "iscrowd": int(cr),
                }
            )
        nd = dets_per_image
        side = np.exp(rng.uniform(np.log(8), np.log(300), (nd, 2)))
        d = np.c_[rng.uniform(0, 1, (nd, 2)) * np.maximum([W, H] - side, 1), side]
        dc = rng.integers(1, n_classes + 1, nd)
        if ng:
            near = rng.random(nd) < 0.5
            src = rng.integers(0, ng, nd)[near]
            d[near] = g[src] + rng.normal(0, 0.1, (len(src), 4)) * np.c_[g[src, 2:], g[src, 2:]]
            d[near, 2:] = np.abs(d[near, 2:]) + 1
            dc[near] = np.where(rng.random(len(src)) < 0.9, gc[src], dc[near])
        scores = rng.random(nd)
        for b, c, s in zip(d, dc, scores, strict=True):
            results.append(
                {
                    "image_id": img,
                    "category_id": int(c),
                    "bbox": [round(float(v), 2) for v in b],
                    "score": round(float(s), 4),
                }
            )
    return {"images": images, "annotations": anns, "categories": categories}, results


def worker(tool: str, gt_path: str, pred_path: str) -> None:
    """Run one tool in this (fresh) process and print a JSON line with its timings and numbers."""
    import contextlib
    import io
    import resource

    t0 = time.perf_counter()
    if tool == "visionflow":
        from components.metrics.coco import COCO_METRIC_NAMES
        from components.metrics.coco_files import load_coco_evaluator, read_user_json

        t_import = time.perf_counter()
        gt = read_user_json(Path(gt_path), "ground truth")
        res = read_user_json(Path(pred_path), "predictions")
        ev, _ = load_coco_evaluator(gt, res, iou_type="bbox")
        t_load = time.perf_counter()
        out = ev.compute()["bbox"]
        stats = [out[k] for k in COCO_METRIC_NAMES]
        t_eval = time.perf_counter()
    else:
        if tool == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
        else:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as COCOeval
        t_import = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(gt_path)
            coco_dt = coco_gt.loadRes(pred_path)
            t_load = time.perf_counter()
            e = COCOeval(coco_gt, coco_dt, "bbox")
            e.evaluate()
            e.accumulate()
            e.summarize()
        stats = [float(v) for v in e.stats[:12]]
        t_eval = time.perf_counter()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(
        json.dumps(
            {
                "tool": tool,
                "import_s": t_import - t0,
                "load_s": t_load - t_import,
                "eval_s": t_eval - t_load,
                "peak_rss_mb": peak_mb,
                "stats": stats,
            }
        )
    )


def run_tool(tool: str, gt_path: Path, pred_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            tool,
            "--gt-file",
            str(gt_path),
            "--pred-file",
            str(pred_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["process_s"] = wall
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--gt", type=float, default=7.0, help="mean ground-truth boxes per image")
    p.add_argument("--dets", type=int, default=100, help="detections per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="runs per tool (the fastest is kept)")
    p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "coco_eval.json")
    p.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    p.add_argument("--gt-file", help=argparse.SUPPRESS)
    p.add_argument("--pred-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.gt_file, args.pred_file)
        return 0

    gt, results = build_workload(args.images, args.classes, args.gt, args.dets, args.seed)
    workload = {
        "images": args.images,
        "classes": args.classes,
        "gt_boxes": len(gt["annotations"]),
        "detections": len(results),
        "seed": args.seed,
    }
    print(f"workload: {workload}")
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_coco_eval_") as tmp:
        gt_path, pred_path = Path(tmp) / "gt.json", Path(tmp) / "results.json"
        gt_path.write_text(json.dumps(gt))
        pred_path.write_text(json.dumps(results))
        del gt, results
        for tool in args.tools:
            runs = [run_tool(tool, gt_path, pred_path) for _ in range(args.repeat)]
            rows[tool] = min(runs, key=lambda r: r["eval_s"])
            r = rows[tool]
            print(
                f"  {tool:<17} process {r['process_s']:7.2f} s  load {r['load_s']:6.2f} s  eval {r['eval_s']:7.2f} s  peak {r['peak_rss_mb']:7.0f} MB",
                flush=True,
            )

    ref = rows.get("pycocotools")
    ours = rows.get("visionflow")
    for r in rows.values():
        if ref:
            r["max_abs_diff_vs_pycocotools"] = max(
                abs(a - b) for a, b in zip(r["stats"], ref["stats"], strict=True)
            )
        if ours:
            r["eval_ratio_vs_visionflow"] = r["eval_s"] / ours["eval_s"]
            r["process_ratio_vs_visionflow"] = r["process_s"] / ours["process_s"]
    print()
    print(
        "| tool | process (s) | load (s) | eval (s) | eval / visionflow | process / visionflow | peak RSS (MB) | max abs diff vs pycocotools |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for tool, r in rows.items():
        diff = r.get("max_abs_diff_vs_pycocotools")
        print(
            f"| {tool} | {r['process_s']:.2f} | {r['load_s']:.2f} | {r['eval_s']:.2f} | {r.get('eval_ratio_vs_visionflow', float('nan')):.2f}x | "
            f"{r.get('process_ratio_vs_visionflow', float('nan')):.2f}x | {r['peak_rss_mb']:.0f} | {'-' if diff is None else f'{diff:.1e}'} |"
        )
    report = {
        "workload": workload,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "command": "python benchmarks/bench_coco_eval.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": rows,
    }
    write_json(report, args.out)
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
