"""DVC: `dvc repro` of the ingest stage, a no-op second repro, agreement with the flows' cache keys, push/pull."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DVC = str(REPO / ".venv/bin/dvc")


def _dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}
    proc = subprocess.run([DVC, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture()
def dvc_project(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    shutil.copytree(REPO / "components", root / "components", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["shapes"].update(num_train=6, num_val=3, num_test=3, image_size=64, min_size=12, max_size=30)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _dvc(root, "init", "-q")
    return root


def test_repro_ingest_then_noop_then_push_pull(dvc_project, tmp_path, monkeypatch):
    from components.data.versioning import dvc_directory_md5

    root = dvc_project
    out = _dvc(root, "repro", "ingest")
    assert "Running stage 'ingest'" in out and (root / "data/shapes/dataset.json").exists()
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["ingest"]
    assert list(lock["params"]["params.yaml"]) == ["data"]  # only the keys the stage reads

    again = _dvc(root, "repro", "ingest")
    assert "Running stage" not in again and "didn't change" in again

    # the data's hash in dvc.lock is the one MLflow's dataset inputs carry
    out_md5 = lock["outs"][0]["md5"]
    assert dvc_directory_md5(root / "data/shapes") == out_md5

    remote = tmp_path / "remote"
    _dvc(root, "remote", "add", "-d", "local", str(remote))
    _dvc(root, "push", "ingest")
    shutil.rmtree(root / "data/shapes")
    shutil.rmtree(root / ".dvc/cache")
    _dvc(root, "pull", "ingest")
    assert dvc_directory_md5(root / "data/shapes") == out_md5  # byte-identical round trip
    assert "up to date" in _dvc(root, "status", "ingest").lower()


def test_dvc_yaml_declares_every_stage_and_registered_models():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = spec["stages"]
    for name in ("ingest", "ingest_source", "augment", "pretrain", "finetune", "detect", "detect_compare", "segment", "segment_compare", "register"):
        assert name in stages, name
    assert stages["detect"]["foreach"] == "${detect.architectures}"
    assert "detect.${item}" in stages["detect"]["do"]["params"]  # a detector re-runs only on its own keys
    assert stages["detect"]["do"]["cmd"] == "visionflow detect --arch ${item}"
    artifacts = spec["artifacts"]
    assert {"visionflow-backbone", "visionflow-classifier"} <= set(artifacts)
    assert all(a["type"] == "model" for a in artifacts.values())
