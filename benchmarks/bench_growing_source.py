"""A VOC folder as a growing source through `visionflow run`: first part, nothing new, then all of it.

    .venv/bin/python benchmarks/bench_growing_source.py      # after ./bootstrap.sh test (or run), in a clean clone

Run it in a clean clone: it writes the clone's ``params.yaml`` (``configs/detect_raccoon.yaml`` with
``data.path`` pointed at a copy that grows, ``params.yaml.bak`` keeps the previous one). It copies the
first ``--first`` images of ``--source`` (sorted by name) and their annotations into ``--work``, runs
`visionflow run`, checks ``dvc status``, runs again with nothing new, copies the rest, runs again, and
reports each run's wall time, which stages ran, the split counts, how many earlier images changed
split, the detector's test mAP@0.5 and the registry's decision (``benchmarks/results/growing_source.json``).
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
from components.pipeline import write_effective_params  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "growing_source.json"


def copy_images(source: Path, work: Path, names: list[str]) -> None:
    """Copy each image of ``names`` and its VOC annotation (``annotations/`` or ``Annotations/``) into ``work``."""
    images = next(d for d in (source / "images", source / "JPEGImages") if d.is_dir())
    notes = next(d for d in (source / "annotations", source / "Annotations") if d.is_dir())
    for sub in ("images", "annotations"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(images / name, work / "images" / name)
        xml = notes / (Path(name).stem + ".xml")
        if xml.exists():
            shutil.copy2(xml, work / "annotations" / xml.name)


def splits(dataset: Path) -> dict[str, str]:
    """``{file name: split}`` of a canonical dataset."""
    out = {}
    for split in ("train", "val", "test"):
        path = dataset / "annotations" / f"instances_{split}.json"
        if path.exists():
            out.update({im["file_name"]: split for im in json.loads(path.read_text())["images"]})
    return out


def run(*argv: str) -> tuple[float, str]:
    env = {**os.environ, "PATH": f"{ROOT / '.venv/bin'}{os.pathsep}{os.environ['PATH']}", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    start = time.perf_counter()
    proc = subprocess.run(list(argv), cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


def one_run(label: str, data_out: Path, arch: str, prefix: str, before: dict[str, str] | None) -> dict:
    seconds, stdout = run("visionflow", "run")
    report = json.loads(stdout.strip().splitlines()[-1])  # `visionflow run` prints its report as one JSON line
    now = splits(data_out)
    row: dict = {"run": label, "wall_s": round(seconds, 1), "outcome": report.get("outcome"),
                 "ran": sorted(k for k, v in report.get("stages", {}).items() if v["state"] in ("ran", "skipped")),
                 "flow_s": (report.get("timing") or {}).get("wall_s"),
                 "splits": {s: sum(1 for v in now.values() if v == s) for s in ("train", "val", "test")}}
    if before is not None:
        row["earlier_images_moved"] = sum(1 for k, v in before.items() if now.get(k) != v)
    metrics = ROOT / "metrics" / "detect" / f"{arch}.json"
    if metrics.exists():
        row["map_50"] = round(json.loads(metrics.read_text())["test"]["map_50"], 4)
    register = report.get("register") or {}
    row["registry"] = {k: {f: v.get(f) for f in ("status", "version", "decision", "candidate_value", "champion_value", "reason") if f in v}
                       for k, v in (register.get("models") or {}).items() if k.startswith(prefix)}
    _, status = run("dvc", "status")
    row["dvc_status"] = status.strip().splitlines()[-1] if status.strip() else ""
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared/data/raccoon")
    parser.add_argument("--first", type=int, default=100, help="images in the first run (sorted by name)")
    parser.add_argument("--work", type=Path, default=ROOT / ".visionflow" / "growing-source")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/detect_raccoon.yaml")
    parser.add_argument("--arch", default="faster_rcnn")
    parser.add_argument("--prefix", default="raccoon")
    parser.add_argument("--set", action="append", default=[], help="extra params overrides")
    args = parser.parse_args(argv)
    images_dir = next(d for d in (args.source / "images", args.source / "JPEGImages") if d.is_dir())
    names = sorted((p.name for p in images_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")), key=lambda n: (len(n), n))
    shutil.rmtree(args.work, ignore_errors=True)
    copy_images(args.source, args.work, names[: args.first])
    overrides = [f"data.path={args.work}", f"detect.architectures=[{args.arch}]", "segment.architectures=[fcn]",
                 "finetune.strategies=[feature_extraction]", f"register.prefix={args.prefix}", *args.set]
    write_effective_params(args.config, overrides, ROOT / "params.yaml")
    data_out = ROOT / yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["out"]
    rows = [one_run(f"first {args.first} images", data_out, args.arch, args.prefix, None)]
    first = splits(data_out)
    rows.append(one_run("nothing new", data_out, args.arch, args.prefix, first))
    copy_images(args.source, args.work, names[args.first:])
    rows.append(one_run(f"all {len(names)} images", data_out, args.arch, args.prefix, first))
    result = {"source": str(args.source), "config": str(args.config.relative_to(ROOT)), "overrides": overrides, "runs": rows}
    write_json(result, RESULT)
    for row in rows:
        print(json.dumps(row))
    return result


if __name__ == "__main__":
    main()
