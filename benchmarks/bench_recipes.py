"""The recipes for real photographs (``configs/photos_boxes.yaml``, ``configs/photos_masks.yaml``), as is, over seeds.

    .venv/bin/python benchmarks/bench_recipes.py [--cases masks:membrane boxes:raccoon boxes:bccd] [--seeds 0 1 2]
                                                 [--jobs 2] [--workdir DIR] [--no-run]

Issue 16, item 4: a user's own data should train well without tuning. Each case is a (recipe, dataset) pair;
the recipe file is used exactly as it ships, only its ``data.path`` pointed at the dataset (and ``data.out`` at the
workdir), through the commands its header gives a user:

1. ``visionflow ingest --params <recipe> --set data.path=<dataset> --set data.out=<workdir>/<case>/data`` once per case
   (raccoon: the recipe's hash split 80/10/10; BCCD: its own ``ImageSets/Main`` train/val/test; membranes: the
   recipe's 70/10/20);
2. ``visionflow detect|segment --params <recipe> --arch <arch> --set <stage>.<arch>.train.seed=<S> ...`` for every
   architecture of the recipe and every seed, each in its own process and folder (``<workdir>/<case>/seed<S>/<arch>``:
   its own ``metrics/``, ``outputs/`` and MLflow store), ``--jobs`` of them at a time (each uses the recipe's one
   torch thread).

Recorded per case, architecture and seed, from the stage's own metrics file: the test split's COCO mAP@0.5 and
mAP@[.5:.95] (detectors) or mIoU and per-class IoU (segmenters), the training's CPU seconds, and the validation
curve (from ``last.pt``); aggregated as mean / sample std over the seeds into
``benchmarks/results/recipes.json``, with ``recipes.png`` (bars = mean, error bars = std, dots = seeds) and
``recipes_curves.png`` (validation metric per epoch, mean +- std band). A job whose folder holds ``result.json`` is not
run again, so an interrupted run continues; ``--no-run`` only aggregates. The seeds vary the training
(initialisation of the new layers, batch order, augmentation draws); the split is the recipe's ``data.seed``.
Needs ``../shared/data`` beside the repository and the offline ImageNet mobilenet_v2 weights
(``scripts/seed_weights.sh``).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.config import load_params  # noqa: E402
from components.io import read_json, write_json  # noqa: E402
from components.training.checkpoint import LAST, load_checkpoint  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_seeds", ROOT / "benchmarks" / "bench_seeds.py")
bench_seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_seeds)  # summarize, epoch_history, curve_band: the seeds benchmark's own

RESULTS = ROOT / "benchmarks" / "results" / "recipes.json"
RECIPES = {"boxes": ("configs/photos_boxes.yaml", "detect"), "masks": ("configs/photos_masks.yaml", "segment")}
# dataset name -> its folder under ../shared/data (the recipe's data.format stays: voc for boxes, masks for masks)
DATASETS = {"raccoon": "raccoon", "bccd": "bccd/BCCD", "membrane": "membrane"}
CASES = ("masks:membrane", "boxes:raccoon", "boxes:bccd")  # cheapest first
# the test metrics kept per stage, and the validation metric its curves show
METRICS = {"detect": ("map_50", "map"), "segment": ("miou",)}
CURVE = {"detect": "map_50", "segment": "miou"}


def case_overrides(case: str, workdir: Path) -> list[str]:
    """``--set`` overrides of one case: the recipe as is, its data read from the dataset and written under ``workdir``."""
    _, dataset = case.split(":")
    return [f"data.path={(ROOT.parent / 'shared' / 'data' / DATASETS[dataset]).resolve()}",
            f"data.out={case_folder(case, workdir) / 'data'}"]


def job_overrides(stage: str, arch: str, seed: int) -> list[str]:
    """The training seed of one architecture (nothing else changes between seeds)."""
    return [f"{stage}.{arch}.train.seed={seed}"]


def job_result(stage: str, arch: str, metrics: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What one (case, arch, seed) job keeps: the stage's test metrics, training CPU seconds and validation curve.

    Args:
        stage: ``detect`` or ``segment``.
        metrics: the stage's ``metrics/<stage>/<arch>.json``.
        history: the epoch records of its ``last.pt`` (:func:`bench_seeds.epoch_history`).

    Returns:
        ``{"status", "metrics": {name: value}, "per_class": {...}, "train_cpu_s", "curve": [val metric per epoch]}``;
        ``status`` and ``reason`` as the stage wrote them when it skipped (e.g. a dataset with no masks).
    """
    if metrics.get("status", "finished") != "finished":
        return {"status": metrics.get("status"), "reason": metrics.get("reason")}
    test = metrics.get("test") or {}
    per_class = test.get("per_class_iou") if stage == "segment" else {k: v.get("ap_50") for k, v in (test.get("per_class") or {}).items()}
    return {
        "status": "finished",
        "metrics": {k: test[k] for k in METRICS[stage] if k in test},
        "per_class": per_class or {},
        "test_images": test.get("num_images"),
        "train_cpu_s": metrics.get("train_cpu_time_s"),
        "epochs": metrics.get("epochs"),
        "curve": [row["val"].get(CURVE[stage]) for row in history if CURVE[stage] in row.get("val", {})],
    }


def aggregate(jobs: Mapping[tuple[str, str, int], Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{case: {arch: {metric: summarize(values over seeds), "per_class": {...}, "train_cpu_s": ..., "curve": ...}}}``.

    Args:
        jobs: ``{(case, arch, seed): job_result(...)}``; skipped jobs are reported with their reason, not averaged.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for case, arch in sorted({(c, a) for c, a, _ in jobs}):
        results = {s: jobs[(c, a, s)] for c, a, s in sorted(jobs) if (c, a) == (case, arch)}
        done = {s: r for s, r in results.items() if r.get("status") == "finished"}
        row: dict[str, Any] = {}
        if not done:
            row["skipped"] = next(iter(results.values())).get("reason")
        else:
            for metric in sorted({m for r in done.values() for m in r["metrics"]}):
                row[metric] = bench_seeds.summarize([r["metrics"][metric] for r in done.values() if metric in r["metrics"]])
            classes = sorted({k for r in done.values() for k in r["per_class"]})
            row["per_class"] = {k: bench_seeds.summarize([r["per_class"][k] for r in done.values() if r["per_class"].get(k) is not None])
                                for k in classes}
            row["train_cpu_s"] = bench_seeds.summarize([r["train_cpu_s"] for r in done.values() if r.get("train_cpu_s") is not None])
            row["test_images"] = next(iter(done.values())).get("test_images")
            row["epochs"] = next(iter(done.values())).get("epochs")
            curves = [r["curve"] for r in done.values() if r.get("curve")]
            if curves:
                mean, std = bench_seeds.curve_band(curves)
                row["curve"] = {"mean": [round(v, 4) for v in mean], "std": [round(v, 4) for v in std]}
            row["seeds"] = sorted(done)
        out.setdefault(case, {})[arch] = row
    return out


# --------------------------------------------------------------------------- the runs


def run_command(argv: Sequence[str], cwd: Path, log: Path, workdir: Path) -> None:
    """Run one ``visionflow`` command (this venv, this checkout's code: :func:`bench_seeds.tool_env`), its output in ``log``."""
    cwd.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        code = subprocess.run(list(argv), cwd=cwd, env=bench_seeds.tool_env(ROOT, workdir), stdout=handle,
                              stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {code}): see {log}")


def run_job(case: str, arch: str, seed: int, workdir: Path) -> dict[str, Any]:
    """Train and evaluate one architecture of one case at one seed in its own process; its :func:`job_result`."""
    recipe, stage = RECIPES[case.split(":")[0]]
    folder = job_folder(case, arch, seed, workdir)
    done = folder / "result.json"
    if done.is_file():
        return read_json(done)
    sets = [*case_overrides(case, workdir), *job_overrides(stage, arch, seed)]
    argv = ["visionflow", stage, "--params", str(ROOT / recipe), "--arch", arch, *(f"--set={o}" for o in sets)]
    started = time.time()
    run_command(argv, folder, folder / "log.txt", workdir)
    metrics = read_json(folder / "metrics" / stage / f"{arch}.json")
    params = load_params(ROOT / recipe, overrides=sets)
    last = folder / getattr(params, stage).out / arch / LAST
    history = bench_seeds.epoch_history(load_checkpoint(last).get("history", [])) if last.is_file() else []
    result = job_result(stage, arch, metrics, history) | {"seed": seed, "wall_s": round(time.time() - started, 1)}
    write_json(result, done)
    print(f"{case} {arch} seed {seed}: {result.get('metrics', result.get('reason'))} "
          f"({result.get('train_cpu_s') or 0:.0f} CPU s, {result['wall_s']:.0f} s)", flush=True)
    return result


def ingest(case: str, workdir: Path) -> None:
    """``visionflow ingest`` of one case's dataset with the recipe's ``data`` section (once: kept when present)."""
    recipe, _ = RECIPES[case.split(":")[0]]
    folder = case_folder(case, workdir)
    if (folder / "data" / "dataset.json").is_file():
        return
    run_command(["visionflow", "ingest", "--params", str(ROOT / recipe), *(f"--set={o}" for o in case_overrides(case, workdir))],
                folder, folder / "ingest.log", workdir)


def collect(cases: Sequence[str], seeds: Sequence[int], workdir: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The finished jobs' results found under ``workdir``."""
    jobs = {}
    for case in cases:
        for arch in architectures(case):
            for seed in seeds:
                path = job_folder(case, arch, seed, workdir) / "result.json"
                if path.is_file():
                    jobs[(case, arch, seed)] = read_json(path)
    return jobs


def architectures(case: str) -> list[str]:
    """The architectures the case's recipe trains (its ``detect``/``segment.architectures``)."""
    recipe, stage = RECIPES[case.split(":")[0]]
    return list(getattr(load_params(ROOT / recipe), stage).architectures)


def job_folder(case: str, arch: str, seed: int, workdir: Path) -> Path:
    """One job's own folder (its metrics/, outputs/ and MLflow store): no two trainings share a file."""
    return case_folder(case, workdir) / f"seed{seed}" / arch


def case_folder(case: str, workdir: Path) -> Path:
    """``<workdir>/<recipe>-<dataset>``: the case's ingested data (``data/``) and its jobs (``seed<S>/<arch>/``)."""
    return workdir / case.replace(":", "-")


def markdown(table: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """The README's table: one row per case and architecture, mean ± std (values) over the seeds, per class, cost."""

    def pm(stats: Mapping[str, Any] | None) -> str:
        if not stats or stats.get("mean") is None:
            return ""
        spread = f" ± {stats['std']:.3f}" if stats.get("std") is not None else ""
        return f"{stats['mean']:.3f}{spread}"

    lines = ["| recipe | data (test images) | model | test mAP@0.5 / mIoU | mAP@[.5:.95] | per class (AP@0.5 / IoU) | seeds | training CPU s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case, archs in table.items():
        recipe, dataset = case.split(":")
        for arch, row in archs.items():
            if "skipped" in row:
                lines.append(f"| {recipe} | {dataset} | {arch} | skipped: {row['skipped']} | | | | |")
                continue
            main = row.get("map_50") or row.get("miou")
            values = ", ".join(f"{v:.3f}" for v in main["values"])
            per_class = ", ".join(f"{k} {v['mean']:.2f}" for k, v in row["per_class"].items() if v.get("mean") is not None)
            lines.append(f"| {recipe} | {dataset} ({row.get('test_images')}) | {arch} | {pm(main)} ({values}) | {pm(row.get('map'))} | "
                         f"{per_class} | {len(row['seeds'])} | {row['train_cpu_s']['mean']:.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def plot(table: Mapping[str, Mapping[str, Mapping[str, Any]]], out: Path) -> list[Path]:
    """``<out stem>.png`` (test metric per case and architecture, mean +- std, seeds as dots) and ``<stem>_curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(case, arch, row) for case, archs in table.items() for arch, row in archs.items() if "skipped" not in row]
    if not rows:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(max(7.0, 1.4 * len(rows) + 2), 4))
    for i, (_, _, row) in enumerate(rows):
        metric = "map_50" if "map_50" in row else "miou"
        stats = row[metric]
        ax.bar(i, stats["mean"], yerr=stats["std"] or 0, capsize=4, color="C0" if metric == "map_50" else "C2", alpha=0.8)
        ax.plot([i] * len(stats["values"]), stats["values"], "k.", ms=6)
        ax.text(i, stats["mean"] + (stats["std"] or 0) + 0.02, f"{stats['mean']:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{c.split(':')[1]}\n{a}\n({'mAP@0.5' if 'map_50' in r else 'mIoU'})" for c, a, r in rows], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_title("recipes as shipped, test split: mean ± std over seeds (dots: seeds)", fontsize=10)
    fig.tight_layout()
    paths.append(out.with_suffix(".png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(rows), figsize=(3 * len(rows), 3), squeeze=False)
    for ax, (case, arch, row) in zip(axes[0], rows, strict=True):
        if "curve" in row:
            mean, std = row["curve"]["mean"], row["curve"]["std"]
            epochs = range(1, len(mean) + 1)
            ax.plot(epochs, mean, "o-", ms=3)
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std, strict=True)], [m + s for m, s in zip(mean, std, strict=True)], alpha=0.25)
        ax.set_title(f"{case.split(':')[1]} {arch}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val " + ("mAP@0.5" if "map_50" in row else "mIoU"), fontsize=8)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    paths.append(out.with_name(out.stem + "_curves.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="recipe:dataset pairs (recipes: boxes, masks)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time (each uses the recipe's one torch thread)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-recipes"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-run", action="store_true", help="only aggregate what the workdir holds")
    args = parser.parse_args(argv)
    for case in args.cases:
        recipe, dataset = case.split(":")
        if recipe not in RECIPES or dataset not in DATASETS:
            parser.error(f"--cases {case}: recipe one of {sorted(RECIPES)}, dataset one of {sorted(DATASETS)}")
    workdir = args.workdir.resolve()
    started = time.time()
    if not args.no_run:
        for case in args.cases:
            ingest(case, workdir)
        # seed by seed (an interrupted run leaves whole seeds), the cheap cases first within a seed
        todo = [(case, arch, seed) for seed in args.seeds for case in args.cases for arch in architectures(case)]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on the training processes
            list(pool.map(lambda job: run_job(*job, workdir), todo))
    jobs = collect(args.cases, args.seeds, workdir)
    table = aggregate(jobs)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    report = {
        "benchmark": "the recipes of configs/ as shipped, on real data, over training seeds (issue 16, item 4)",
        "recipes": {name: recipe for name, (recipe, _) in RECIPES.items()},
        "datasets": {name: f"../shared/data/{folder}" for name, folder in DATASETS.items()},
        "cases": table,
        "seeds": sorted(args.seeds),
        "commit": commit,
        "command": f"python benchmarks/bench_recipes.py --cases {' '.join(args.cases)} --seeds {' '.join(map(str, args.seeds))}",
        "seconds": None if args.no_run else round(time.time() - started, 1),  # None: aggregated with --no-run
        "jobs_wall_s": round(sum(j.get("wall_s", 0.0) for j in jobs.values()), 1),
        "note": "test split of each dataset; mean and sample std over the seeds; train_cpu_s is each training's CPU seconds (one torch thread)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, args.out)
    for path in plot(table, args.out):
        print("figure:", path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    print(markdown(table))
    return report


if __name__ == "__main__":
    main()
