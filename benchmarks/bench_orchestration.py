"""Orchestration overhead: the same small pipeline through Prefect, through ``dvc repro``, and stage by stage.

    .venv/bin/python benchmarks/bench_orchestration.py [--work /tmp/visionflow-bench-orchestration] [--skip prefect]

The pipeline is shrunk with ``--set``-style overrides (:data:`SMALL`: 32/8/8 shapes images, 1 epoch
of 2 steps per training stage, one strategy/detector/segmenter) and small source folders (20
images per class of ``cifar10_subset`` and ``hymenoptera_data``, copied to the work folder), so
that every tool finishes in minutes; the figures measure the *tools*, not training. Each tool runs
in its own fresh copy of the repository (``--work``; this checkout is never written to), whose
``params.yaml`` has the overrides applied, so all three read identical params:

* **direct**: each ``dvc.yaml`` stage command (``visionflow ingest``, ..., ``visionflow register``)
  as its own process, in dependency order; the sum of their wall times is the work itself plus
  one Python start-up per stage;
* **dvc**: ``dvc repro`` (full), then ``dvc repro`` again (no-op: every stage up to date);
* **prefect**: ``visionflow run`` (the retrain flow on a temporary Prefect server: each stage's
  command as a child process, two at a time, then ``dvc commit``), then again (no-op: ``dvc status``
  finds every stage up to date).

Overhead of a tool = its full-run wall time minus the direct sum. Writes
``benchmarks/results/orchestration.json``. The CPU is shared with other jobs while measuring, so
single figures vary by tens of percent between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.io import write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "orchestration.json"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PER_CLASS = 20
TRAIN = "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=8", "train.threads=1"
SMALL = [
    "data.shapes.num_train=32", "data.shapes.num_val=8", "data.shapes.num_test=8",
    *(f"pretrain.{t}" for t in TRAIN),
    "finetune.strategies=[fine_tuning]", *(f"finetune.{t}" for t in TRAIN),
    "detect.architectures=[yolo]", *(f"detect.yolo.{t}" for t in TRAIN), "detect.yolo.hidden=64",
    "segment.architectures=[fcn]", *(f"segment.fcn.{t}" for t in TRAIN),
    "orchestration.retries=0",
]
# the repository content a run needs (no .venv: it is linked; no outputs of this checkout)
COPY = ["components", "flows", "dvc.yaml", ".dvcignore", "pyproject.toml", "prefect.yaml", "README.md"]


def small_sources(work: Path) -> dict[str, Path]:
    """``PER_CLASS`` images per class and split of the two ImageFolder sources, copied once."""
    out = {}
    for name, folder in (("cifar10", "cifar10_subset"), ("hymenoptera", "hymenoptera_data")):
        dst = work / "sources" / folder
        out[name] = dst
        if dst.exists():
            continue
        for split_dir in sorted(p for p in (SHARED / folder).iterdir() if p.is_dir()):
            for cls in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                target = dst / split_dir.name / cls.name
                target.mkdir(parents=True)
                for f in sorted(cls.iterdir())[:PER_CLASS]:
                    shutil.copy2(f, target / f.name)
    return out


def fresh_repo(work: Path, name: str, sources: dict[str, Path]) -> Path:
    """A clean copy of the repository with the small params written into its params.yaml."""
    from components.config import apply_overrides, validate_params

    repo = work / name
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    for item in COPY:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, repo / item)
    (repo / ".venv").symlink_to(ROOT / ".venv")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")  # the architecture lists come from params: no trimming
    overrides = SMALL + [f"orchestration.datasets.{k}.path={v}" for k, v in sources.items()]
    tree = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    validate_params(tree)
    (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run([str(ROOT / ".venv/bin/dvc"), "init", "-q"], repo)
    return repo


def run(cmd: list[str], cwd: Path, *, log: Path | None = None) -> float:
    """Run ``cmd``; wall seconds. Raises CalledProcessError (with the log's tail) when it fails."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "TQDM_DISABLE": "1",
           # the ephemeral server's 20 s default start-up limit is too short on a busy shared CPU
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PATH": f"{ROOT / '.venv/bin'}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    with open(log or os.devnull, "a") as fh:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise subprocess.CalledProcessError(done.returncode, cmd, output=tail)
    return seconds


def stage_commands(repo: Path) -> list[tuple[str, list[str]]]:
    """``dvc.yaml``'s commands in dependency order, as the flow reads them (:func:`components.pipeline.load_stages`)."""
    from components.pipeline import load_stages

    return [(stage.name, ["bash", "-c", stage.cmd]) for stage in load_stages(repo)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/visionflow-bench-orchestration"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["direct", "dvc", "prefect"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    sources = small_sources(args.work)
    venv = ROOT / ".venv/bin"
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    result: dict = {
        **{tool: previous[tool] for tool in args.skip if tool in previous},  # figures of tools skipped this time
        "benchmark": "orchestration overhead: Prefect vs dvc repro vs stages called directly",
        "overrides": SMALL, "sources": {k: f"{v} ({PER_CLASS} images per class and split)" for k, v in sources.items()},
        "note": "small --set overrides so that it finishes in minutes; CPU shared with other jobs while measured",
    }

    if "direct" not in args.skip:
        repo = fresh_repo(args.work, "direct", sources)
        per_stage = {}
        for name, cmd in stage_commands(repo):
            per_stage[name] = round(run(cmd, repo, log=repo / "direct.log"), 2)
            print(f"direct {name}: {per_stage[name]} s", file=sys.stderr)
        result["direct"] = {"sum_s": round(sum(per_stage.values()), 2), "per_stage_s": per_stage,
                            "rerun_s": "no cache: a re-run repeats every stage"}
        write_result(args.out, result)

    tools = {"dvc": ([str(venv / "dvc"), "repro"], "dvc repro"), "prefect": ([str(venv / "visionflow"), "run"], "visionflow run")}
    for tool, (cmd, label) in tools.items():
        if tool in args.skip:
            continue
        repo = fresh_repo(args.work, tool, sources)
        full = run(cmd, repo, log=repo / f"{tool}.log")
        noop = run(cmd, repo, log=repo / f"{tool}.log")  # nothing changed: every stage cached / skipped
        result[tool] = {"command": label, "full_s": round(full, 2), "noop_rerun_s": round(noop, 2)}
        print(f"{label}: full {full:.1f} s, no-op {noop:.1f} s", file=sys.stderr)
        write_result(args.out, result)

    base = result.get("direct", {}).get("sum_s")
    rows = [("stages called directly (sum)", base, "-")]
    for tool in ("dvc", "prefect"):
        if tool in result:
            full, noop = result[tool]["full_s"], result[tool]["noop_rerun_s"]
            if base is not None:
                result[tool]["overhead_s"] = round(full - base, 2)
            rows.append((f"{tool} full run", full, noop))
    print(f"{'':32}  {'full run s':>10}  {'no-op re-run s':>14}")
    for name, full, noop in rows:
        print(f"{name:32}  {full if full is not None else '-':>10}  {noop:>14}")
    write_result(args.out, result)
    return result


def write_result(path: Path, result: dict) -> None:
    """Write (and re-write after each tool, so a failing tool keeps the others' figures)."""
    result["machine"] = {"cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, path)


if __name__ == "__main__":
    main()
