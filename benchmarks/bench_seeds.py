"""Every learnt model of the pipeline over three training seeds: mean, sample std and the seeds' values.

    .venv/bin/python benchmarks/bench_seeds.py [--seeds 0 1 2] [--workdir DIR] [--reuse] [--set KEY=VALUE ...]
    .venv/bin/python benchmarks/bench_seeds.py --workdir DIR --no-run     # aggregate what DIR holds, even unfinished

``--commit REV`` pins the clone, so that the seeds of one commit can run in several workdirs at once (copy their
``seeds/<S>`` folders into one workdir, then ``--no-run`` there).

What it does, in a clean project so that nothing of the working tree leaks in:

1. ``git clone`` of this repository's ``HEAD`` into ``<workdir>/visionflow`` (``<workdir>/shared`` links to the
   ``shared/`` folder beside this repository, so ``orchestration.datasets``' ``../shared/data/...`` resolve), run
   with this venv's ``visionflow`` on ``PATH`` and ``PYTHONPATH=<clone>``: the clone's code runs (checked and
   printed: ``components.__file__`` must lie in the clone, since this repository is installed editable), with its
   own Prefect home and MLflow store.
2. Seed 0: ``visionflow run`` at the defaults (``--set`` adds only the benchmark's own overrides, e.g. a tiny
   smoke test). Seeds 1, 2: ``visionflow run --set detect.<arch>.train.seed=S ... segment.<arch>.train.seed=S ...
   finetune.train.seed=S``. DVC re-runs only the detect, segment and finetune stages (and those reading their
   outputs: compare, lineage, register); ingest, augment and pretrain stay cached. So the data split (``data.seed``),
   the augmentation policy and the pretrained backbone are the same in every seed: the spread measured is the
   downstream training's (initialisation of the new layers, batch order, augmentation draws, dropout).
3. After each seed: ``metrics/detect/*.json``, ``metrics/segment/*.json`` and ``metrics/finetune.json`` are copied
   to ``<workdir>/seeds/<S>/``, with each model's per-epoch validation history (read from its ``last.pt``) in
   ``history.json`` and the run's report, seconds and load average in ``run.json`` (``--reuse`` skips a seed whose
   ``run.json`` exists: an interrupted run continues where it stopped).
4. ``benchmarks/results/seeds.json`` in the shape of issue 16 (``{"detectors": {arch: {"map_50": {"mean", "std",
   "values"}, "map": ...}}, "segmenters": ..., "finetune": ..., "commit", "params_hash"}``; ``std`` is the sample
   standard deviation, ``ddof=1``), the issue's targets checked against the means, and four figures:
   ``seeds_detectors.png``, ``seeds_segmenters.png``, ``seeds_finetune.png`` (bars = mean, error bars = std, dots =
   seeds, lines = targets) and ``seeds_curves.png`` (validation metric per epoch, mean +- std band over seeds);
   the figures are named after ``--out``'s stem, so a larger budget keeps its own (``--out .../budget.json --set
   detect.ssd.train.epochs=16 ...``: ``budget.json``, ``budget_detectors.png``, ...).

The metrics are the stages' own: detectors' COCO mAP@0.5 and mAP@[.5:.95] on the shapes test split, segmenters'
test mIoU (Mask R-CNN: also its instance ``segm`` mAP), finetune strategies' accuracy on hymenoptera's ``val`` split
(the only held-out split it has). Nothing here chooses anything on the test split: each stage keeps its last epoch
(``early_stopping.monitor: null``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# imported once, at the start: the working tree may change while the seeds run (the runs use the clone's code)
from components.config import load_params  # noqa: E402
from components.io import content_hash, read_json, write_json  # noqa: E402
from components.training.checkpoint import LAST, load_checkpoint  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# issue 16, item 2: (family, model, metric) -> the mean it asks for; std <= STD_TARGET for every learnt model
TARGETS: dict[tuple[str, str, str], float] = {
    **{("detectors", arch, "map_50"): 0.6 for arch in ("yolo", "ssd", "faster_rcnn", "retinanet", "rcnn", "fast_rcnn")},
    ("segmenters", "fcn", "miou"): 0.65,
    ("segmenters", "unet", "miou"): 0.65,
    ("segmenters", "mask_rcnn", "miou"): 0.6,
    ("segmenters", "mask_rcnn", "segm_map"): 0.5,
    ("finetune", "best", "accuracy"): 0.95,
}
STD_TARGET = 0.05
# the lecture's baselines: expected *below* the learnt detectors, no target of their own
BASELINES = ("sliding_window", "overfeat")
# the validation metric each family's curves show (the key in the epoch record's ``val`` dict)
CURVE_METRIC = {"detectors": "map_50", "segmenters": "miou", "finetune": "accuracy"}
# the relay of the flow's log: a stage starting (``<stage>: visionflow ...``) or a task run finishing
PROGRESS = re.compile(r"Task run '(?P<task>[^']+)' - (?P<what>Finished in state \w+|\S+: visionflow .*)")


# --------------------------------------------------------------------------- pure parts (tested)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "values", "n"}`` of one metric over seeds; ``std`` is the sample std (ddof=1), None for n < 2.

    Args:
        values: the metric of each seed, in seed order (NaN/None already dropped by the caller).
    """
    vals = [float(v) for v in values]
    mean = statistics.fmean(vals) if vals else None
    std = statistics.stdev(vals) if len(vals) >= 2 else None
    return {"mean": _round(mean), "std": _round(std), "values": [_round(v) for v in vals], "n": len(vals)}


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def seed_metrics(metrics_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """The figures of one seed from its copied metrics files: ``{family: {model: {metric: value}}}``.

    ``metrics_dir`` holds ``detect/<arch>.json``, ``segment/<arch>.json`` and ``finetune.json`` as the stages wrote
    them. A model whose file says ``status: skipped`` (or lacks the metric) is left out. ``train_cpu_s`` (the
    training's CPU seconds) comes along where the file has it: what a budget costs, beside what it gives.
    """
    out: dict[str, dict[str, dict[str, float]]] = {"detectors": {}, "segmenters": {}, "finetune": {}}

    def cost(data: Mapping[str, Any], key: str) -> dict[str, float]:  # the training's CPU seconds, where the stage wrote them
        return {"train_cpu_s": data[key]} if isinstance(data.get(key), int | float) else {}

    for path in sorted((metrics_dir / "detect").glob("*.json")):
        data = read_json(path)
        test = data.get("test") or {}
        if data.get("status", "finished") == "finished" and "map_50" in test:
            out["detectors"][path.stem] = {"map_50": test["map_50"], "map": test["map"], **cost(data, "train_cpu_time_s")}
    for path in sorted((metrics_dir / "segment").glob("*.json")):
        data = read_json(path)
        test = data.get("test") or {}
        if data.get("status", "finished") != "finished" or "miou" not in test:
            continue
        row = {"miou": test["miou"], **cost(data, "train_cpu_time_s")}
        if isinstance(test.get("segm"), dict):  # Mask R-CNN: instance masks, COCO segm mAP
            row.update(segm_map=test["segm"]["map"], segm_map_50=test["segm"]["map_50"])
        out["segmenters"][path.stem] = row
    finetune = metrics_dir / "finetune.json"
    if finetune.is_file():
        for strategy, row in (read_json(finetune).get("strategies") or {}).items():
            if isinstance(row, dict) and "accuracy" in row:
                out["finetune"][strategy] = {"accuracy": row["accuracy"], **cost(row, "train_cpu_s")}
    return out


def aggregate(per_seed: Mapping[int, Mapping[str, Mapping[str, Mapping[str, float]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Issue 16's shape from each seed's figures: ``{family: {model: {metric: summarize(values over seeds)}}}``.

    Args:
        per_seed: ``{seed: seed_metrics(...)}``. A model or metric missing in some seed is summarised over the
            seeds that have it (``n`` says how many).
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    seeds = sorted(per_seed)
    for family in ("detectors", "segmenters", "finetune"):
        models = sorted({m for s in seeds for m in per_seed[s].get(family, {})})
        out[family] = {}
        for model in models:
            metrics = sorted({k for s in seeds for k in per_seed[s].get(family, {}).get(model, {})})
            out[family][model] = {}
            for metric in metrics:
                values = [per_seed[s][family][model][metric] for s in seeds if metric in per_seed[s].get(family, {}).get(model, {})]
                values = [v for v in values if v is not None and not math.isnan(v)]
                out[family][model][metric] = summarize(values) | {"seeds": [s for s in seeds if metric in per_seed[s].get(family, {}).get(model, {})]}
    return out


def target_of(table: Mapping[str, Mapping[str, Mapping[str, Any]]], family: str, model: str, metric: str) -> float | None:
    """The issue's target for one bar: its own, or the finetune target when ``model`` is the best strategy by mean."""
    if (family, model, metric) in TARGETS:
        return TARGETS[(family, model, metric)]
    best = TARGETS.get((family, "best", metric))
    means = {m: v[metric]["mean"] for m, v in table.get(family, {}).items() if v.get(metric, {}).get("mean") is not None}
    return best if best is not None and means and max(means, key=means.__getitem__) == model else None


def check_targets(table: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Issue 16's item 2 against the aggregated table: one row per target (mean and std both checked).

    The finetune target is for the best strategy by mean validation accuracy (``model: "best"`` names it);
    the std target (<= 0.05) is checked on the same metric for every row.
    """
    rows = []
    for (family, model, metric), target in TARGETS.items():
        name = model
        if family == "finetune" and model == "best":
            strategies = {s: v[metric]["mean"] for s, v in table.get(family, {}).items() if v.get(metric, {}).get("mean") is not None}
            if not strategies:
                continue
            name = max(strategies, key=strategies.__getitem__)
        stats = table.get(family, {}).get(name, {}).get(metric)
        if not stats or stats.get("mean") is None:
            continue
        std = stats.get("std")
        rows.append({
            "family": family, "model": name, "metric": metric, "target": target, "mean": stats["mean"], "std": std,
            "n": stats["n"], "mean_met": stats["mean"] >= target, "std_met": None if std is None else std <= STD_TARGET,
        })
    return rows


def params_hash(params: Mapping[str, Any]) -> str:
    """The identity of the defaults the seeds share: :func:`components.io.content_hash` of the resolved params.

    Args:
        params: the validated params as plain data (``Params.model_dump(mode="json")``) at seed 0, i.e. before
            the per-seed ``train.seed`` overrides, so every seed of one run reports the same hash.
    """
    return content_hash(dict(params))


def seed_overrides(params: Mapping[str, Any], seed: int) -> list[str]:
    """``--set`` overrides that give every detect, segment and finetune training run ``seed`` (nothing else).

    Args:
        params: the project's params as plain data (its ``detect.architectures``, ``segment.architectures``).
    """
    sets = [f"detect.{arch}.train.seed={seed}" for arch in params["detect"]["architectures"]]
    sets += [f"segment.{arch}.train.seed={seed}" for arch in params["segment"]["architectures"]]
    return [*sets, f"finetune.train.seed={seed}"]


def epoch_history(history: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The scalars of a checkpoint's ``history``: ``[{"epoch", "lr", "train_*", "val": {metric: float}}]``."""
    rows = []
    for record in history:
        row = {k: v for k, v in record.items() if k != "val" and isinstance(v, int | float)}
        row["val"] = {k: float(v) for k, v in (record.get("val") or {}).items() if isinstance(v, int | float)}
        rows.append(row)
    return rows


def curve_band(curves: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """Per-epoch mean and sample std (0 where one seed only) of equally long curves; shorter ones are cut to the shortest."""
    length = min(len(c) for c in curves)
    means, stds = [], []
    for i in range(length):
        column = [c[i] for c in curves]
        means.append(statistics.fmean(column))
        stds.append(statistics.stdev(column) if len(column) >= 2 else 0.0)
    return means, stds


def val_curves(histories: Mapping[int, Mapping[str, Mapping[str, list[dict[str, Any]]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every model's validation metric per epoch over the seeds: ``{family: {model: {metric, mean, std, n}}}`` (:func:`curve_band`)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for family, metric in CURVE_METRIC.items():
        for model in sorted({m for h in histories.values() for m in h.get(family, {})}):
            curves = [[e["val"][metric] for e in h[family][model] if metric in e.get("val", {})] for h in histories.values() if model in h.get(family, {})]
            curves = [c for c in curves if c]
            if curves:
                means, stds = curve_band(curves)
                out.setdefault(family, {})[model] = {"metric": metric, "mean": means, "std": stds, "n": len(curves)}
    return out


def curve_verdict(means: Sequence[float], target: float | None) -> dict[str, Any]:
    """What a mean validation curve says about a target: still rising at the end, and an *extrapolated* budget.

    The budget is an extrapolation, not a measurement: a least-squares line of the metric against
    ``log(epoch)`` (diminishing returns: each doubling of the epochs adds the same) through the whole curve,
    solved for the target. Under a cosine schedule the last epochs flatten by construction, so this reads the
    trend of the whole run, not its tail.

    Args:
        means: mean validation metric per epoch (epoch 1 first).
        target: the value asked for (None: no budget).

    Returns:
        ``{"epochs", "last", "gain_last_epoch", "gain_last_third", "rising", "gain_per_doubling",
        "extrapolated_epochs"}``; ``extrapolated_epochs`` is None without a target or when the trend is flat or
        falling, and the current epochs when the curve's last value already meets the target.
    """
    n = len(means)
    third = max(1, n // 3)
    out: dict[str, Any] = {
        "epochs": n,
        "last": _round(means[-1]) if n else None,
        "gain_last_epoch": _round(means[-1] - means[-2]) if n >= 2 else None,
        "gain_last_third": _round(means[-1] - means[-1 - third]) if n > third else None,
    }
    out["rising"] = bool(out["gain_last_third"] is not None and out["gain_last_third"] > 0.005)
    slope = None
    if n >= 3:
        xs = [math.log(e) for e in range(1, n + 1)]
        mx, my = statistics.fmean(xs), statistics.fmean(means)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, means, strict=True)) / sum((x - mx) ** 2 for x in xs)
        out["gain_per_doubling"] = _round(slope * math.log(2))
        if target is not None and means[-1] >= target:
            out["extrapolated_epochs"] = n
        elif target is not None and slope > 1e-6:
            out["extrapolated_epochs"] = math.ceil(math.exp((target - (my - slope * mx)) / slope))
        else:
            out["extrapolated_epochs"] = None
    return out


# --------------------------------------------------------------------------- the clean project and the runs


def tool_env(clone: Path, workdir: Path) -> dict[str, str]:
    """The environment of the runs: this venv's tools, the clone's code first on ``sys.path``, no network."""
    env = {**os.environ}
    env.update(
        PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(clone),
        PREFECT_HOME=str(workdir / "prefect"),  # its own Prefect database, not the one other runs on this machine share
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
        PYTHONUNBUFFERED="1",  # the flow's log reaches run.log (and the progress lines) as it happens
    )
    env.pop("VISIONFLOW_PARENT_RUN_ID", None)
    return env


def make_clone(workdir: Path, *, reuse: bool, commit: str = "HEAD") -> Path:
    """``<workdir>/visionflow``: a clone of this repository at ``commit`` (kept when ``reuse`` and present), ``shared`` linked."""
    clone = workdir / "visionflow"
    if clone.exists() and not reuse:
        shutil.rmtree(clone)
    if not clone.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "checkout", "--quiet", commit], cwd=clone, check=True)
    shared = workdir / "shared"
    if not shared.exists() and (ROOT.parent / "shared").is_dir():
        shared.symlink_to(ROOT.parent / "shared", target_is_directory=True)
    return clone


def committed_params(clone: Path, overrides: list[str]) -> dict[str, Any]:
    """The clone's committed ``params.yaml`` (not the working copy, which holds the last seed's) with ``overrides``, validated."""
    text = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=clone, capture_output=True, text=True, check=True).stdout
    committed = clone / ".visionflow" / "params.committed.yaml"
    committed.parent.mkdir(parents=True, exist_ok=True)
    committed.write_text(text)
    return load_params(committed, overrides).model_dump(mode="json")


def check_code_path(clone: Path, env: Mapping[str, str]) -> str:
    """Where ``components`` is imported from in the runs' environment; raises unless it is the clone's."""
    proc = subprocess.run(
        ["python", "-c", "import components, flows.cli; print(components.__file__)"], cwd=clone, env=dict(env), capture_output=True, text=True, check=True
    )
    where = proc.stdout.strip()
    if not Path(where).resolve().is_relative_to(clone.resolve()):
        raise SystemExit(f"bench_seeds: the runs would import components from {where}, not from the clone {clone}: check PYTHONPATH")
    return where


def run_pipeline(clone: Path, env: Mapping[str, str], overrides: Sequence[str], log_path: Path, label: str) -> tuple[dict[str, Any], float]:
    """``visionflow run --set ...`` in the clone; its output to ``log_path``, stage starts/ends relayed; (report, seconds)."""
    argv = ["visionflow", "run", *(f"--set={o}" for o in overrides)]
    start = time.perf_counter()
    last_json = ""
    loads: list[float] = []
    done = threading.Event()

    def sample_load() -> None:  # the machine's 1-min load average every 30 s while the run lasts
        while not done.wait(30.0):
            loads.append(os.getloadavg()[0])

    threading.Thread(target=sample_load, daemon=True).start()
    with log_path.open("w") as log:
        log.write(" ".join(argv) + "\n")
        proc = subprocess.Popen(argv, cwd=clone, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.startswith("{"):
                last_json = line
            match = PROGRESS.search(line)
            if match:
                print(f"[{label} {time.strftime('%H:%M:%S')} +{time.perf_counter() - start:6.0f}s] {match['task']}: {match['what'][:120]}", flush=True)
        code = proc.wait()
    done.set()
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"bench_seeds: `{' '.join(argv[:2])}` ({label}) exited {code}; its output: {log_path}")
    report = json.loads(last_json) if last_json else {}
    report["load_average_1min"] = {"mean": _round(statistics.fmean(loads), 2) if loads else None, "max": _round(max(loads), 2) if loads else None,
                                   "samples": len(loads)}
    if report.get("outcome") == "failed":  # components.run_report.outcome: failed | trained | up to date
        failed = sorted(k for k, v in (report.get("stages") or {}).items() if v.get("state") != "ran" and v.get("state") != "up to date")
        raise SystemExit(f"bench_seeds: stages failed or not run in {label}: {failed}; see {log_path}; rerun with --reuse")
    return report, seconds


def save_seed(clone: Path, dest: Path) -> None:
    """Copy one seed's metrics files and each model's per-epoch validation history (from its ``last.pt``) to ``dest``."""
    params = load_params(clone / "params.yaml")
    # only the architectures this run trained: the clone's metrics/ also holds the committed files of the others
    for sub, archs in (("detect", params.detect.architectures), ("segment", params.segment.architectures)):
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for arch in archs:
            shutil.copy2(clone / "metrics" / sub / f"{arch}.json", dest / sub / f"{arch}.json")
    shutil.copy2(clone / "metrics" / "finetune.json", dest / "finetune.json")
    folders = {
        "detectors": {a: clone / params.detect.out / a for a in params.detect.architectures},
        "segmenters": {a: clone / params.segment.out / a for a in params.segment.architectures},
        "finetune": {s: clone / params.finetune.out / s for s in params.finetune.strategies},
    }
    history: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for family, models in folders.items():
        history[family] = {}
        for model, folder in models.items():
            if (folder / LAST).is_file():
                history[family][model] = epoch_history(load_checkpoint(folder / LAST).get("history", []))
    write_json(history, dest / "history.json")


def save_partial(clone: Path, dest: Path, seed: int) -> dict[str, Any]:
    """An unfinished seed: copy what the stages that finished since it started wrote, as :func:`save_seed` does.

    A stage finished in this seed's run when its metrics file is newer than the run's start (``dest/started``,
    else the clone's checkout (its git index): a clone made for this one seed). Writes and returns ``run.json`` marked ``partial``.
    """
    started = float((dest / "started").read_text()) if (dest / "started").is_file() else (clone / ".git" / "index").stat().st_mtime
    params = load_params(clone / "params.yaml")

    def fresh(path: Path) -> bool:  # written by this seed's run (a finished stage also left its last.pt)
        return path.is_file() and path.stat().st_mtime > started

    history: dict[str, dict[str, list[dict[str, Any]]]] = {"detectors": {}, "segmenters": {}, "finetune": {}}
    finished = []
    for stale in [*dest.glob("detect/*.json"), *dest.glob("segment/*.json"), dest / "finetune.json"]:  # an earlier collection's
        stale.unlink(missing_ok=True)
    for sub, family, out, archs in (("detect", "detectors", params.detect.out, params.detect.architectures),
                                    ("segment", "segmenters", params.segment.out, params.segment.architectures)):
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for arch in archs:
            if fresh(clone / "metrics" / sub / f"{arch}.json"):
                shutil.copy2(clone / "metrics" / sub / f"{arch}.json", dest / sub / f"{arch}.json")
                history[family][arch] = epoch_history(load_checkpoint(clone / out / arch / LAST).get("history", []))
                finished.append(f"{sub}@{arch}")
    if fresh(clone / "metrics" / "finetune.json"):
        shutil.copy2(clone / "metrics" / "finetune.json", dest / "finetune.json")
        for strategy in params.finetune.strategies:
            history["finetune"][strategy] = epoch_history(load_checkpoint(clone / params.finetune.out / strategy / LAST).get("history", []))
        finished.append("finetune")
    write_json(history, dest / "history.json")
    run = {"seed": seed, "partial": True, "finished_stages": finished, "seconds": round(time.time() - started, 1),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "note": "collected before the run ended (--no-run)"}
    write_json(run, dest / "run.json")
    return run


# --------------------------------------------------------------------------- figures


def _bars(ax: Any, table: Mapping[str, Any], family: str, metric: str, models: Sequence[str], title: str) -> None:
    family_table = table[family]
    xs = range(len(models))
    means = [family_table[m][metric]["mean"] for m in models]
    stds = [family_table[m][metric]["std"] or 0.0 for m in models]
    colors = ["#bbbbbb" if m in BASELINES else "#4c72b0" for m in models]
    ax.bar(xs, means, yerr=stds, capsize=4, color=colors, edgecolor="black", linewidth=0.5, label="mean (error bar: sample std)")
    labelled = False
    for x, m in zip(xs, models, strict=True):
        values = family_table[m][metric]["values"]
        ax.scatter([x] * len(values), values, color="black", s=12, zorder=3, label="seeds" if x == 0 else None)
        std = family_table[m][metric]["std"]
        text = f"{means[x]:.2f}" + ("" if std is None else f"\n±{std:.2f}")
        ax.annotate(text, (x, min(0.97, means[x] + (std or 0.0) + 0.02)), ha="center", va="bottom", fontsize=7)
        target = target_of(table, family, m, metric)
        if target is not None:
            ax.hlines(target, x - 0.4, x + 0.4, colors="#c44e52", linestyles="--", label=None if labelled else "issue 16 target")
            labelled = True
    ax.set_xticks(list(xs), models, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


def plot_family(table: Mapping[str, Any], family: str, metrics: Sequence[tuple[str, str]], path: Path, title: str) -> Path | None:
    """Bars of the mean per model with std error bars, seed values as dots, targets as dashed lines; one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    family_table = table.get(family) or {}
    panels = [(m, label, [k for k in family_table if m in family_table[k]]) for m, label in metrics]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 + 0.55 * max(len(p[2]) for p in panels) * len(panels), 4.2), squeeze=False)
    for ax, (metric, label, models) in zip(axes[0], panels, strict=True):
        _bars(ax, table, family, metric, models, label)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    n = max(s[metric]["n"] for s in family_table.values() for metric in s)
    fig.suptitle(f"{title} (mean ± sample std over {n} seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(curves: Mapping[str, Mapping[str, Mapping[str, Any]]], table: Mapping[str, Any], path: Path) -> Path | None:
    """Validation metric per epoch of every model (:func:`val_curves`), mean +- std band over the seeds; a dashed line at the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(family, model, curve) for family, models in curves.items() for model, curve in models.items()]
    if not panels:
        return None
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax, (family, model, curve) in zip(axes.flat, panels, strict=False):
        metric, means, stds = curve["metric"], curve["mean"], curve["std"]
        epochs = list(range(1, len(means) + 1))
        ax.plot(epochs, means, color="#4c72b0", marker="o", markersize=3)
        ax.fill_between(epochs, [m - s for m, s in zip(means, stds, strict=True)], [m + s for m, s in zip(means, stds, strict=True)], alpha=0.25, color="#4c72b0")
        target = target_of(table, family, model, metric)
        if target is not None:
            ax.axhline(target, color="#c44e52", linestyle="--", linewidth=1)
        ax.set_title(f"{model}: val {metric} ({curve['n']} seeds)", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Validation metric per epoch: mean ± sample std over seeds (dashed: issue 16 target)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2; the first one should be 0, the defaults)")
    parser.add_argument("--workdir", type=Path, default=None, help="the clone, its outputs and each seed's saved metrics (default: a new temp dir)")
    parser.add_argument("--reuse", action="store_true", help="continue in --workdir: keep its clone, skip seeds whose results are saved")
    parser.add_argument("--commit", default="HEAD", help="the commit to clone (e.g. another machine's or process's seeds of the same commit)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="extra params override for every seed (e.g. a tiny smoke run)")
    parser.add_argument("--no-run", action="store_true", help="start no pipeline: aggregate the saved seeds; a seed without results "
                        "gets the stages its clone finished so far (marked partial), e.g. at a deadline")
    parser.add_argument("--out", type=Path, default=RESULTS / "seeds.json", help="the results file; the figures are named after "
                        "its stem (seeds.json: seeds_detectors.png, ...), so a larger budget (--set ...epochs=N) can keep its own")
    parser.add_argument("--plots", type=Path, default=None, help="folder of the figures (default: the folder of --out)")
    parser.add_argument("--note", default=None, help="a sentence kept in the results file (e.g. which seeds' files came from another run)")
    args = parser.parse_args(argv)

    import tempfile

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-seeds-"))).resolve()
    if args.workdir and workdir.exists() and any(workdir.iterdir()) and not (args.reuse or args.no_run) and (workdir / "seeds").exists():
        raise SystemExit(f"bench_seeds: {workdir} holds an earlier run: pass --reuse to continue it, or another --workdir")
    total_start = time.perf_counter()
    clone = make_clone(workdir, reuse=args.reuse or args.no_run, commit=args.commit)
    env = tool_env(clone, workdir)
    code_at = check_code_path(clone, env)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True, check=True).stdout.strip()
    defaults = committed_params(clone, list(args.set))
    if any(k.startswith(("detect.", "segment.", "finetune.")) and ".train.seed=" in k for k in args.set):
        raise SystemExit("bench_seeds: --set must not set a train.seed: the seeds come from --seeds")
    print(f"bench_seeds: clone {clone} at {commit[:12]}; the runs import components from {code_at}", flush=True)
    print(f"bench_seeds: seeds {args.seeds}, extra overrides {args.set or 'none'}, logs in {workdir / 'seeds'}", flush=True)

    per_seed: dict[int, dict[str, Any]] = {}
    histories: dict[int, Any] = {}
    runs: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        dest = workdir / "seeds" / str(seed)
        saved = read_json(dest / "run.json") if (dest / "run.json").is_file() else None
        if args.no_run and saved is None:
            saved = save_partial(clone, dest, seed)
            print(f"bench_seeds: seed {seed}: not finished; collected the stages it finished: {saved['finished_stages']}", flush=True)
        elif args.no_run or (args.reuse and saved is not None and not saved.get("partial")):
            print(f"bench_seeds: seed {seed}: saved results reused ({dest}{', partial' if saved.get('partial') else ''})", flush=True)
        else:  # a partial seed re-runs: DVC skips the stages it finished
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "started").write_text(str(time.time()))
            overrides = [*args.set, *seed_overrides(defaults, seed)]
            load_before = os.getloadavg()
            print(f"bench_seeds: seed {seed}: visionflow run ({len(overrides)} overrides)", flush=True)
            report, seconds = run_pipeline(clone, env, overrides, dest / "run.log", f"seed {seed}")
            save_seed(clone, dest)
            stages = {k: {"state": v.get("state"), "seconds": v.get("seconds")} for k, v in (report.get("stages") or {}).items()}
            write_json({"seed": seed, "seconds": round(seconds, 1), "load_average_before": [round(x, 2) for x in load_before],
                        "load_average_after": [round(x, 2) for x in os.getloadavg()], "load_average_during": report["load_average_1min"], "overrides": overrides, "outcome": report.get("outcome"),
                        "stages": stages, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, dest / "run.json")
            ran = sorted(k for k, v in stages.items() if v["state"] == "ran")
            print(f"bench_seeds: seed {seed} done in {seconds:.0f} s; stages run: {ran}", flush=True)
        per_seed[seed] = seed_metrics(dest)
        histories[seed] = read_json(dest / "history.json")
        runs[seed] = read_json(dest / "run.json")

    table = aggregate(per_seed)
    targets = check_targets(table)
    curves = val_curves(histories)
    for row in targets:  # the validation curve behind each target: still rising? what budget, extrapolated?
        curve = curves.get(row["family"], {}).get(row["model"])
        if curve is not None:
            row["val_curve"] = curve_verdict(curve["mean"], row["target"] if row["metric"] == curve["metric"] else None)
    result = {
        **table,
        "targets": targets,
        "curves": "val_curve: mean validation metric over seeds per epoch; extrapolated_epochs = EXTRAPOLATION (a line in log(epoch)), not measured; "
                  "val_curves: every model's validation metric per epoch, mean and sample std over the seeds (what *_curves.png draws)",
        "val_curves": {f: {m: {**c, "mean": [_round(x) for x in c["mean"]], "std": [_round(x) for x in c["std"]]} for m, c in ms.items()}
                       for f, ms in curves.items()},
        "std": "sample standard deviation over seeds (ddof=1)",
        "commit": commit,
        "params_hash": params_hash(defaults),
        "seeds": args.seeds,
        "varied": "detect.<arch>.train.seed, segment.<arch>.train.seed, finetune.train.seed (data.seed, augment and pretrain fixed: cached)",
        "extra_overrides": list(args.set),
        **({"note": args.note} if args.note else {}),
        "metrics": {
            "detectors": "COCO mAP@0.5 (map_50) and mAP@[.5:.95] (map) on the shapes test split",
            "segmenters": "test mIoU; Mask R-CNN also instance segm mAP (segm_map, segm_map_50)",
            "finetune": "accuracy on hymenoptera's val split",
            "train_cpu_s": "CPU seconds of the training (the stage's train_cpu_time_s / train_cpu_s), per model: the cost",
        },
        "runs": {str(s): {k: runs[s].get(k) for k in ("seconds", "partial", "load_average_during", "load_average_before", "finished", "stages")} for s in args.seeds},
        "partial_seeds": {str(s): runs[s]["finished_stages"] for s in args.seeds if runs[s].get("partial")},
        "seconds_total": round(sum(runs[s]["seconds"] for s in args.seeds), 1),
        "this_invocation_s": round(time.perf_counter() - total_start, 1),
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform, "python": sys.version.split()[0],
                    "note": "2 cores shared with other jobs: wall times are the loaded machine's (load averages per seed)"},
    }
    write_json(result, args.out)
    plots, stem = args.plots or args.out.parent, args.out.stem  # seeds.json -> seeds_detectors.png, ...
    plot_family(table, "detectors", [("map_50", "test mAP@0.5"), ("map", "test mAP@[.5:.95]")], plots / f"{stem}_detectors.png", "Detectors on shapes")
    plot_family(table, "segmenters", [("miou", "test mIoU"), ("segm_map", "Mask R-CNN test segm mAP")], plots / f"{stem}_segmenters.png", "Segmenters on shapes")
    plot_family(table, "finetune", [("accuracy", "hymenoptera val accuracy")], plots / f"{stem}_finetune.png", "Transfer learning")
    plot_curves(curves, table, plots / f"{stem}_curves.png")
    for row in result["targets"]:
        std = "n/a" if row["std"] is None else f"{row['std']:.3f}"
        print(f"{row['family']:>10} {row['model']:<18} {row['metric']:<9} {row['mean']:.3f} +- {std} (target {row['target']}: "
              f"{'met' if row['mean_met'] else 'MISSED'}; std {'ok' if row['std_met'] else 'n/a' if row['std_met'] is None else 'TOO HIGH'})")
    print(f"bench_seeds: {args.out} ({result['seconds_total']:.0f} s of pipeline runs)")
    return result


if __name__ == "__main__":
    main()
