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


#: the module each stage's command runs (flows/cli.py dispatches `visionflow <stage>` to it)
STAGE_ENTRY = {
    "ingest": "components.data.ingest",
    "ingest_source": "components.data.ingest",
    "augment": "components.augment",
    "pretrain": "components.stages.pretrain",
    "finetune": "components.stages.finetune",
    "detect": "components.stages.detect",
    "segment": "components.stages.segment",
    "rcnn_lineage": "components.stages.lineage",
    "register": "components.stages.register",
}
#: stages whose command runs one function of a declared module (`--compare`: reads the metrics JSON, draws the plot)
PARTIAL_STAGES = {"detect_compare", "segment_compare"}
#: code that cannot change a stage's outputs, so not a dependency: error messages, the params schema (the values a stage
#: reads are its `params`), MLflow logging (register declares it: the registry is what it writes), docstring-only packages
NOT_OUTPUT_CODE = {
    "components/__init__.py", "components/errors.py", "components/config.py", "components/tracking.py",
    "components/stages/__init__.py", "components/metrics/__init__.py",
}


def _imported_files(module: str, stop: set[str]) -> set[str]:
    """The repository files ``module`` imports, at module or function level, transitively (not descending into ``stop``)."""
    import ast

    def path_of(name: str) -> Path | None:
        p = REPO.joinpath(*name.split("."))
        return p / "__init__.py" if (p / "__init__.py").is_file() else p.with_suffix(".py") if p.with_suffix(".py").is_file() else None

    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = path_of(name)
        rel = path and str(path.relative_to(REPO))
        if rel is None or rel in seen:
            continue
        seen.add(rel)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages' __init__ run too
        if rel in stop:
            continue
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module
                todo += [base, *(f"{base}.{a.name}" for a in node.names)]
    return {f for f in seen if f.startswith("components/")}


def test_every_stage_depends_on_the_code_it_runs():
    """A change to any file a stage's command imports makes `dvc status` report the stage (and `visionflow run` re-run it).

    Found by this test: finetune trained with pretrain.py's fit_classifier and scored with metrics/classification.py
    without declaring either, so a change to how a classifier trains or is scored left finetune "up to date".
    """
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_ENTRY) | PARTIAL_STAGES
    cli = (REPO / "flows/cli.py").read_text()
    gaps = {}
    for stage, module in STAGE_ENTRY.items():
        assert module.rsplit(".", 1)[0] in cli, f"flows/cli.py no longer dispatches to {module}"
        spec = stages[stage].get("do", stages[stage])
        declared = [d.rstrip("/") for d in spec["deps"] if d.startswith("components")]
        missing = sorted(
            f for f in _imported_files(module, NOT_OUTPUT_CODE) - NOT_OUTPUT_CODE if not any(f == d or f.startswith(d + "/") for d in declared)
        )
        if missing:
            gaps[stage] = missing
    assert not gaps, f"dvc.yaml: stages run code they do not declare as deps: {gaps}"
    for stage in PARTIAL_STAGES:
        assert any(d.startswith("components/stages/") for d in stages[stage]["deps"])


def test_dependency_scan_sees_function_level_imports():
    files = _imported_files("components.stages.finetune", NOT_OUTPUT_CODE)
    assert {"components/stages/pretrain.py", "components/metrics/classification.py", "components/training/checkpoint.py"} <= files
    assert "components/tracking.py" in files and "components/distributed.py" not in _imported_files("components.errors", NOT_OUTPUT_CODE)
