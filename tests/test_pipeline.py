"""One execution path: the flow runs dvc.yaml's stages as processes, leaves dvc.lock true, same inputs give the same model.

The end-to-end tests train every stage a few steps on tiny data in real DVC projects (``tests/pipeline_project.py``):
``visionflow run`` in one, ``dvc repro`` in another; the two must agree bit for bit on every checkpoint and on
every quality number, and each must find nothing to do after the other.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from pipeline_project import BIN, lock_outs, make_project, run_tool, tool_env

TIMING_WORDS = ("time", "_s", "seconds", "per_s", "run_id", "ms", "fps", "throughput", "checkpoint", "cpu")


def _quality(tree):
    """Every number of a metrics file except timings, run ids and paths."""
    if isinstance(tree, dict):
        return {k: _quality(v) for k, v in tree.items() if not any(w in k.lower() for w in TIMING_WORDS)}
    if isinstance(tree, list):
        return [_quality(v) for v in tree]
    return tree


def _metrics(root: Path) -> dict[str, object]:
    return {str(p.relative_to(root)): _quality(json.loads(p.read_text())) for p in sorted((root / "metrics").rglob("*.json")) if p.name != "register.json"}


@pytest.fixture(scope="module")
def flow_and_repro(tmp_path_factory, prefect_harness, mlflow_db_template):
    """Workspace A: ``visionflow run``; workspace B: ``dvc repro``; both from the same sources and params.

    B's stages up to ``register`` run while A's flow runs (separate workspaces and processes: the same inputs give
    the same bytes whatever the load); B's ``register`` runs after A's, so it meets the versions A registered.
    """
    base = tmp_path_factory.mktemp("e2e")
    shutil.copy(mlflow_db_template, base / "mlflow.db")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    a = make_project(base / "a", base / "sources", uri)
    b = make_project(base / "b", base / "sources", uri)
    from flows.retrain import run_pipeline

    upstream = [n for n in run_tool(b, "dvc", "stage", "list", "--name-only").stdout.split() if n != "register"]
    log = base / "b-upstream.log"  # a file, not a pipe: nobody reads it while A's flow runs
    with log.open("w") as handle:
        b_upstream = subprocess.Popen([str(BIN / "dvc"), "repro", *upstream], cwd=b, env=tool_env(), stdout=handle, stderr=subprocess.STDOUT)
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.chdir(a)
                mp.delenv("VISIONFLOW_PARENT_RUN_ID", raising=False)
                report = run_pipeline("params.yaml", [])
            b_upstream.wait(timeout=900)
        finally:
            b_upstream.kill()
    assert b_upstream.returncode == 0, f"dvc repro (all but register) in B exited {b_upstream.returncode}:\n{log.read_text()[-3000:]}"
    repro = run_tool(b, "dvc", "repro")  # register only: everything else is up to date
    assert repro.stdout.count("Running stage") == 1 and "Running stage 'register'" in repro.stdout, repro.stdout
    return a, b, report, repro


def test_flow_leaves_dvc_lock_true(flow_and_repro):
    a, _, report, _ = flow_and_repro
    states = {k: v["state"] for k, v in report["stages"].items()}
    assert report["outcome"] == "trained" and set(states.values()) <= {"ran", "skipped"}, states
    stages = yaml.safe_load((a / "dvc.yaml").read_text())
    assert "detect@yolo" in states and "segment@fcn" in states and "register" in states and len(states) >= len(stages["stages"])
    status = run_tool(a, "dvc", "status").stdout
    assert "up to date" in status, status
    again = run_tool(a, "dvc", "repro").stdout
    assert "Running stage" not in again, again
    stage_seconds = sum(e["seconds"] for e in report["stages"].values())
    assert 0 < report["timing"]["stages_s"] <= stage_seconds + 1e-6  # two at a time: their union, not their sum
    assert report["timing"]["overhead_s"] == pytest.approx(report["timing"]["wall_s"] - report["timing"]["stages_s"], abs=0.02)
    # each stage process received the run context: its MLflow run is a child of the flow's, tagged with the flow run
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=yaml.safe_load((a / "params.yaml").read_text())["tracking"]["uri"])
    children = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], f"tags.`mlflow.parentRunId` = '{report['mlflow_run_id']}'")
    names = {r.info.run_name for r in children}
    assert {"pretrain", "detect-yolo", "segment-fcn"} <= names, names
    assert {r.data.tags.get("visionflow.prefect_flow_run_id") for r in children} == {report["flow_run_id"]}


def test_flow_and_dvc_repro_give_the_same_models(flow_and_repro):
    a, b, _, _ = flow_and_repro
    outs_a, outs_b = lock_outs(a), lock_outs(b)
    checkpoints = [p for p in outs_a if p.startswith(("outputs/pretrain", "outputs/finetune", "outputs/detect/", "outputs/segment/"))]
    assert {"outputs/pretrain", "outputs/detect/yolo", "outputs/segment/fcn"} <= set(checkpoints)
    # every output but the ones that plot measured speed (comparison.png, the lineage's timings) is a function of its inputs
    timed = ("comparison.png", "lineage")
    differ = {p: (outs_a[p], outs_b.get(p)) for p in outs_a
              if outs_a[p] != outs_b.get(p) and not p.endswith(timed) and not p.startswith("metrics/")}  # metrics: below
    assert not differ, differ
    assert _metrics(a) == _metrics(b)


def test_after_dvc_repro_the_flow_trains_nothing(flow_and_repro, monkeypatch):
    _, b, _, _ = flow_and_repro
    from flows.retrain import run_pipeline

    monkeypatch.chdir(b)
    report = run_pipeline("params.yaml", [])
    assert report["outcome"] == "up to date" and not report["stages"], report.get("changes")
    assert report["timing"]["wall_s"] < 10


def test_the_registry_grows_only_when_a_model_changes(flow_and_repro):
    """B's dvc repro trained the same bytes as A's flow: its register stage added no version."""
    a, b, _, _ = flow_and_repro
    first = json.loads((a / "metrics/register.json").read_text())
    second = json.loads((b / "metrics/register.json").read_text())
    versions_a = {k: v["version"] for k, v in first.get("registered", {}).items()}
    versions_b = {k: v["version"] for k, v in second.get("unchanged", {}).items()}
    assert versions_a and versions_a == versions_b and not second.get("registered"), (versions_a, second)


# --------------------------------------------------------------------------- the stage table


def test_stage_lists_come_from_params(tmp_path):
    """Shrinking the architecture lists needs no edit of dvc.yaml: compare, lineage and register still resolve."""
    from components.pipeline import load_stages

    root = tmp_path / "p"
    root.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["detect"]["architectures"] = ["yolo"]
    params["segment"]["architectures"] = ["unet"]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run_tool(root, "dvc", "init", "--no-scm", "-q")
    stages = {s.name: s for s in load_stages(root)}
    assert {n for n in stages if n.startswith(("detect@", "segment@"))}, list(stages)
    assert {n for n in stages if n.startswith(("detect@", "segment@"))} == {"detect@yolo", "segment@unet"}
    assert {"detect@yolo", "segment@unet", "detect_compare", "segment_compare", "finetune", "pretrain"} <= set(stages["register"].upstream)
    assert "detect@yolo" in stages["detect_compare"].upstream and "pretrain" in stages["detect@yolo"].upstream
    order = list(stages)
    assert all(order.index(u) < order.index(n) for n, s in stages.items() for u in s.upstream)


def test_effective_params_are_written_like_dvc_exp_run(tmp_path):
    from components.errors import ConfigError
    from components.pipeline import write_effective_params

    repo_params = Path(__file__).resolve().parents[1] / "params.yaml"
    dest = tmp_path / "params.yaml"
    shutil.copy(repo_params, dest)
    assert not write_effective_params(dest, [], dest)
    assert write_effective_params(dest, ["detect.yolo.lambda_coord=2.0"], dest)
    assert yaml.safe_load(dest.read_text())["detect"]["yolo"]["lambda_coord"] == 2.0
    assert yaml.safe_load((tmp_path / "params.yaml.bak").read_text())["detect"]["yolo"]["lambda_coord"] == 5.0
    before = dest.read_text()
    with pytest.raises(ConfigError, match="lambda_coord"):
        write_effective_params(dest, ["detect.yolo.lambda_coord=-1"], dest)
    assert dest.read_text() == before  # invalid params never touch the file


def test_a_retry_resumes_the_stage(tmp_path, prefect_harness, monkeypatch):
    """A stage that exits 75 (transient) is retried with --resume; one that exits 2 is not retried."""
    from components.pipeline import load_stages
    from flows.retrain import run_stages

    fake = tmp_path / "bin"
    fake.mkdir()
    script = fake / "visionflow"
    script.write_text(
        "#!/bin/sh\necho \"$@\" >> calls.txt\nmkdir -p outputs/pretrain\n"
        "if [ \"$1\" = finetune ]; then exit 2; fi\n"
        "if [ ! -f attempted ]; then touch attempted; echo 'tracking server down' >&2; exit 75; fi\n"
        "echo weights > outputs/pretrain/backbone.pt\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    root = tmp_path / "p"
    root.mkdir()
    (root / "dvc.yaml").write_text(
        "stages:\n  pretrain:\n    cmd: visionflow pretrain\n    outs: [outputs/pretrain]\n"
        "  finetune:\n    cmd: visionflow finetune\n    deps: [outputs/pretrain]\n    outs: [outputs/finetune]\n"
    )
    run_tool(root, "dvc", "init", "--no-scm", "-q")
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    from prefect import flow

    @flow
    def pipeline():
        return run_stages(load_stages(root), root, force=False, context={}, retries=2, retry_delay=0)

    outcome = pipeline()
    calls = (root / "calls.txt").read_text().splitlines()
    assert calls == ["pretrain", "pretrain --resume", "finetune"], calls
    assert outcome["pretrain"]["state"] == "ran" and outcome["finetune"]["state"] == "failed"
    assert "exit 2" in outcome["finetune"]["reason"]
    assert "pretrain" in yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def test_lock_drift_names_changed_code_and_params(tmp_path):
    from components.pipeline import lock_drift

    root = tmp_path / "p"
    root.mkdir()
    (root / "code.py").write_text("x = 1\n")
    (root / "params.yaml").write_text("k: 1\n")
    (root / "dvc.yaml").write_text("stages:\n  s:\n    cmd: cp code.py out.txt\n    deps: [code.py]\n    params: [k]\n    outs: [out.txt]\n")
    run_tool(root, "dvc", "init", "--no-scm", "-q")
    run_tool(root, "dvc", "repro")
    (root / "out.txt").unlink()  # a fresh clone has no outputs: that is not drift
    assert lock_drift(root) == []
    (root / "code.py").write_text("x = 2\n")
    (root / "params.yaml").write_text("k: 2\n")
    drift = lock_drift(root)
    assert len(drift) == 1 and "code.py" in drift[0] and "k" in drift[0], drift


def test_watch_triggers_once_per_change_of_the_sources(tmp_path):
    import threading

    from components.pipeline import watch_sources

    root = tmp_path / "p"
    (root / "src").mkdir(parents=True)
    (root / "src" / "a.txt").write_text("a")
    (root / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: cp -r src data\n    deps: [src]\n    outs: [data]\n")
    run_tool(root, "dvc", "init", "--no-scm", "-q")
    run_tool(root, "dvc", "repro")
    seen: list[list[str]] = []
    stop = threading.Event()
    thread = threading.Thread(target=watch_sources, args=(root, seen.append), kwargs={"interval": 0.2, "stop": stop}, daemon=True)
    thread.start()
    try:
        _wait(lambda: False, 1.0)
        assert seen == []  # nothing new: no run
        (root / "src" / "b.txt").write_text("b")
        assert _wait(lambda: len(seen) == 1, 30), seen
        _wait(lambda: False, 1.0)
        assert len(seen) == 1 and "ingest" in seen[0][0]  # one run per change, not one per poll
    finally:
        stop.set()
        thread.join(10)


def _wait(predicate, seconds: float) -> bool:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --------------------------------------------------------------------------- the user's own, growing data


def _splits(dataset: Path) -> dict[str, str]:
    """``{image stem: split}`` of a canonical dataset."""
    out = {}
    for split in ("train", "val", "test"):
        path = dataset / "annotations" / f"instances_{split}.json"
        if path.exists():
            for image in json.loads(path.read_text())["images"]:
                out[Path(image["file_name"]).stem] = split
    return out


@pytest.fixture(scope="module")
def own_data_runs(tmp_path_factory, prefect_harness, mlflow_db_template):
    """A VOC folder the project has never seen, run through `visionflow run`, then grown by half and run again."""
    from pipeline_project import write_voc_folder

    from flows.retrain import run_pipeline

    base = tmp_path_factory.mktemp("own")
    shutil.copy(mlflow_db_template, base / "mlflow.db")
    voc = base / "photos"
    write_voc_folder(voc, 0, 30)
    root = make_project(base / "project", base / "sources", f"sqlite:///{base / 'mlflow.db'}", voc=voc)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["split"] = {"train": 0.6, "val": 0.2, "test": 0.2}
    params["register"]["prefix"] = "own"
    params["detect"]["architectures"] = ["yolo"]  # one detector is the loop under test (two run in flow_and_repro)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("VISIONFLOW_PARENT_RUN_ID", raising=False)
        for grow in (0, 15):
            if grow:
                write_voc_folder(voc, 30, grow)
            report = run_pipeline("params.yaml", [])
            runs.append({"report": report, "splits": _splits(root / "data/own"), "register": json.loads((root / "metrics/register.json").read_text())})
    return root, runs


def test_own_data_first_run(own_data_runs):
    root, (first, _) = own_data_runs
    stages = first["report"]["stages"]
    assert first["report"]["outcome"] == "trained"
    assert stages["detect@yolo"]["state"] == "ran" and stages["register"]["state"] == "ran"
    assert stages["segment@fcn"]["state"] == "skipped" and "mask" in stages["segment@fcn"]["reason"]  # boxes only: said, not failed
    assert len(first["splits"]) == 30


def test_new_data_retrains_and_no_image_changes_split(own_data_runs):
    root, (first, second) = own_data_runs
    stages = second["report"]["stages"]
    assert stages["ingest"]["state"] == "ran" and stages["detect@yolo"]["state"] == "ran", stages
    assert stages["pretrain"]["state"] == "up to date"  # its data did not change
    assert len(second["splits"]) == 45
    assert {k: second["splits"][k] for k in first["splits"]} == first["splits"]
    assert "up to date" in run_tool(root, "dvc", "status").stdout


def test_the_registered_version_is_its_own_and_met_the_champion_on_the_same_split(own_data_runs):
    import torch
    from mlflow import MlflowClient

    from components.data.versioning import dvc_directory_md5

    root, (first, second) = own_data_runs
    name = "own-detector-yolo"
    entry = second["register"]["registered"][name]
    assert entry["version"] != first["register"]["registered"][name]["version"]  # a new model, a new version
    params = yaml.safe_load((root / "params.yaml").read_text())
    client = MlflowClient(tracking_uri=params["tracking"]["uri"])
    version = client.get_model_version(name, str(entry["version"]))
    tags = version.tags
    assert tags["visionflow.data_hash"] == dvc_directory_md5(root / "data/own")
    for key in ("gate.champion_value", "gate.candidate_value", "gate.test_data_hash"):
        assert key in tags, sorted(tags)
    assert float(tags["gate.candidate_value"]) == pytest.approx(json.loads((root / "metrics/detect/yolo.json").read_text())["test"]["map_50"], abs=1e-6)
    ckpt = torch.load(root / "outputs/detect/yolo/best.pt", map_location="cpu", weights_only=False)
    assert list(ckpt["categories"]) == ["box", "disk"]
    assert tags.get("visionflow.checkpoint_sha256") and ckpt["dataset"]["md5"] == dvc_directory_md5(root / "data/own")
