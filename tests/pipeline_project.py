"""A tiny, real DVC project of this repository for end-to-end tests of the pipeline (flow and ``dvc repro``).

:func:`make_project` copies ``components/`` and ``dvc.yaml`` into a folder, writes a ``params.yaml``
whose stages train a few steps on data made here (:func:`write_voc_folder`, :func:`write_class_folders`),
and runs ``git init`` and ``dvc init``. The stage commands are the installed ``visionflow`` CLI, the
same code the copy holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
VOC_CLASSES = ("box", "disk")


def tool_env() -> dict[str, str]:
    """The environment of a ``dvc``/``visionflow`` child process: the venv first on PATH, no network."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    env.pop("VISIONFLOW_PARENT_RUN_ID", None)
    return env


def run_tool(root: Path, *argv: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``dvc ...`` or ``visionflow ...`` in ``root``; on failure the assertion shows the output's end."""
    proc = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=root, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def write_voc_folder(root: Path, start: int, count: int, *, size: int = 64) -> list[str]:
    """``count`` VOC images (``img_<i>.jpg`` + XML) of boxes and disks on noise, numbered from ``start``; returns the stems."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    stems = []
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        pixels = (rng.random((size, size, 3)) * 60 + 40).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        objects = []
        for _ in range(int(rng.integers(1, 3))):
            cls = VOC_CLASSES[int(rng.integers(0, 2))]
            w, h = (int(v) for v in rng.integers(size // 4, size // 2, 2))
            x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            colour = (230, 60, 40) if cls == "box" else (40, 90, 230)
            (draw.rectangle if cls == "box" else draw.ellipse)([x0, y0, x0 + w - 1, y0 + h - 1], fill=colour)
            objects.append(f"<object><name>{cls}</name><difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
                           f"<xmax>{x0 + w}</xmax><ymax>{y0 + h}</ymax></bndbox></object>")
        stem = f"img_{i:04d}"
        image.save(root / "JPEGImages" / f"{stem}.jpg", quality=92)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{size}</width><height>{size}</height><depth>3</depth></size>"
            + "".join(objects) + "</annotation>"
        )
        stems.append(stem)
    return stems


def write_class_folders(root: Path, *, per_class: int = 8, size: int = 32) -> Path:
    """An ImageFolder source (``train/`` and ``val/``, classes ``red`` and ``blue``) of noisy colour images."""
    for split, n in (("train", per_class), ("val", max(2, per_class // 2))):
        for c, name in enumerate(("red", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng(1000 * c + i + (0 if split == "train" else 500))
                base = np.array([200, 40, 40] if c == 0 else [40, 40, 200], dtype=float)
                pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
    return root


def _tiny_train(epochs: int = 1, steps: int = 2, batch: int = 4) -> dict[str, Any]:
    return {"epochs": epochs, "batch_size": batch, "max_steps_per_epoch": steps, "threads": 1}


def tiny_params(root: Path, sources: Path, tracking_uri: str, *, voc: Path | None = None) -> dict[str, Any]:
    """``params.yaml`` of the repository with every stage shrunk to a few steps on data under ``sources``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    classes = write_class_folders(sources / "classes") if not (sources / "classes").exists() else sources / "classes"
    if voc is not None:
        params["data"].update(format="voc", path=str(voc), out="data/own")
    else:
        params["data"]["shapes"].update(num_train=8, num_val=4, num_test=4, image_size=64, min_size=12, max_size=30)
    params["orchestration"]["datasets"] = {
        "cifar10": {"format": "imagefolder", "path": str(classes), "out": "data/cifar10"},
        "hymenoptera": {"format": "imagefolder", "path": str(classes), "out": "data/hymenoptera"},
    }
    params["orchestration"].update(retry_delay_seconds=0)
    params["pretrain"]["train"].update(_tiny_train(batch=8))
    params["finetune"].update(strategies=["scratch", "own_fine_tuning"], image_size=32, own_image_size=32)
    params["finetune"]["train"].update(_tiny_train())
    params["detect"]["architectures"] = ["yolo", "faster_rcnn"]
    for arch in ("yolo", "faster_rcnn"):
        params["detect"][arch].update(image_size=64)
        params["detect"][arch]["train"].update(_tiny_train())
    params["detect"]["yolo"]["S"] = 2
    params["segment"]["architectures"] = ["fcn"]
    params["segment"]["fcn"].update(image_size=64)
    params["segment"]["fcn"]["train"].update(_tiny_train())
    params["augment"]["preview_samples"] = 2
    params["tracking"].update(uri=tracking_uri, experiment="e2e")
    return params


def make_project(root: Path, sources: Path, tracking_uri: str, *, voc: Path | None = None) -> Path:
    """A DVC project at ``root``: a copy of ``components/`` and ``dvc.yaml``, tiny params, git and DVC initialised."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "components", root / "components", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(root, sources, tracking_uri, voc=voc), sort_keys=False))
    (root / ".gitignore").write_text("/data/\n/outputs/\n.visionflow/\nmlflow.db\nmlartifacts/\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    run_tool(root, "dvc", "init", "-q")
    return root


def lock_outs(root: Path) -> dict[str, str]:
    """``{out path: md5}`` of every cached output recorded in ``dvc.lock``."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for stage in lock.values() for o in stage.get("outs", []) if o.get("md5")}
