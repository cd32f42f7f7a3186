"""Registry: pyfunc models logged with their code, aliases, the promotion gate, a consumer without the repository."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import Gate, load_params
from components.tracking import decide_promotion

REPO = Path(__file__).resolve().parents[1]


def png_bytes(size: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- the gate, pure


@pytest.mark.parametrize(
    ("cand", "champ_version", "champ", "margin", "higher", "promoted"),
    [
        (0.7, None, None, 0.0, True, True),  # no champion yet
        (0.7, "1", 0.8, 0.0, True, False),  # worse
        (0.8, "1", 0.8, 0.0, True, False),  # equal does not beat
        (0.81, "1", 0.8, 0.02, True, False),  # better, but below the margin
        (0.83, "1", 0.8, 0.02, True, True),  # better by the margin
        (0.2, "1", 0.3, 0.05, False, True),  # lower is better
        (float("nan"), None, None, 0.0, True, False),  # a diverged candidate never promotes
        (None, "1", 0.8, 0.0, True, False),
    ],
)
def test_gate_decision(cand, champ_version, champ, margin, higher, promoted):
    gate = Gate(metric="m", margin=margin, higher_is_better=higher)
    decision = decide_promotion(model="x", candidate_version="2", candidate_value=cand, champion_version=champ_version, champion_value=champ, gate=gate)
    assert decision.promoted is promoted
    assert decision.as_tags()["gate.promoted"] == str(promoted)
    assert decision.reason


# --------------------------------------------------------------------------- the register stage against a real store


def test_register_stage_versions_aliases_card_and_lineage(registry_store):
    from mlflow import MlflowClient

    cfg, uri, work, report = registry_store
    assert set(report["registered"]) == {"visionflow-backbone", "visionflow-classifier", "visionflow-detector-yolo", "visionflow-segmenter-fcn"}
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("visionflow-detector-yolo", "champion")
    assert client.get_model_version_by_alias("visionflow-detector-yolo", "candidate").version == mv.version
    assert mv.tags["gate.promoted"] == "True" and mv.tags["metric.map_50"] == "0.5"
    for key in ("visionflow.git_commit", "visionflow.data_hash", "visionflow.params_hash", "visionflow.register_run_id", "visionflow.checkpoint_sha256",
                "gate.test_data_hash", "gate.decision"):
        assert mv.tags.get(key), key
    assert mv.tags["gate.decision"] == "promoted" and mv.tags["gate.comparison"] == "none"
    assert mv.tags["visionflow.data_hash_verified"] == "false"  # the fixture's checkpoints record no dataset md5
    assert json.loads(mv.tags["visionflow.categories"]) == ["circle", "square"]
    assert "## Metrics" in mv.description and "map_50" in mv.description and "## Lineage" in mv.description
    run = client.get_run(mv.tags["visionflow.register_run_id"])
    assert run.data.tags["visionflow.params_hash"] == mv.tags["visionflow.params_hash"]
    assert json.loads((work / "metrics/register.json").read_text())["registered"]["visionflow-segmenter-fcn"]["promoted"] is True


def _reregister(work: Path, uri: str, metrics: dict, *, diverged: bool = False, status: str | None = None, revision: int | None = None) -> dict:
    """Re-run register on the classifier; ``revision`` rewrites its checkpoint first (new bytes: a new model)."""
    from conftest import write_tiny_checkpoint

    from components.stages.register import run_register

    if revision is not None:
        write_tiny_checkpoint(work / "outputs/finetune/fine_tuning/best.pt", task="classification", model_name="classifier",
                              model_args={"num_classes": 2, "backbone": "convnet_small", "weights": None}, categories=["ants", "bees"], image_size=32,
                              revision=revision)
    (work / "metrics/finetune.json").write_text(json.dumps({"fine_tuning": {"test": metrics, **({"status": status} if status else {})}}))
    marker = work / "outputs/finetune/fine_tuning/diverged.json"
    if diverged:
        marker.write_text("{}")
    elif marker.exists():
        marker.unlink()
    params = load_params(REPO / "params.yaml", [f"tracking.uri={uri}", "tracking.experiment=registry", "detect.architectures=[]",
                                               "segment.architectures=[]", "finetune.strategies=[fine_tuning]", "register.classifier.margin=0.05"])
    cwd = os.getcwd()
    os.chdir(work)
    try:
        return run_register(params)
    finally:
        os.chdir(cwd)


def test_gate_worse_stays_better_moves_failed_moves_nothing(registry_store):
    from mlflow import MlflowClient

    _, uri, work, _ = registry_store
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = "visionflow-classifier"
    champion = str(client.get_model_version_by_alias(name, "champion").version)

    same = _reregister(work, uri, {"accuracy": 0.99})  # the same checkpoint: nothing new, whatever its metrics say
    assert name not in same["registered"] and same["unchanged"][name]["reason"] == f"unchanged: version {champion}"

    worse = _reregister(work, uri, {"accuracy": 0.7}, revision=1)["registered"][name]
    assert worse["promoted"] is False
    # the fixture's data is no canonical dataset: the champion's own number, measured on the same data hash, is compared
    assert worse["comparison"] == "recorded" and worse["champion_value"] == 0.8
    assert str(client.get_model_version_by_alias(name, "champion").version) == champion
    assert str(client.get_model_version_by_alias(name, "candidate").version) == worse["version"]
    assert client.get_model_version(name, worse["version"]).tags["gate.promoted"] == "False"

    versions_before = len(client.search_model_versions(f"name='{name}'"))
    for revision, kwargs in ((2, {"diverged": True}), (3, {"status": "failed"})):  # (margin and NaN cases: test_gate_decision)
        report = _reregister(work, uri, {"accuracy": 0.99}, revision=revision, **kwargs)
        assert name in report["refused"] and name not in report["registered"]
    assert len(client.search_model_versions(f"name='{name}'")) == versions_before  # nothing registered from failed runs
    assert str(client.get_model_version_by_alias(name, "champion").version) == champion

    better = _reregister(work, uri, {"accuracy": 0.9}, revision=4)["registered"][name]
    assert better["promoted"] is True
    assert str(client.get_model_version_by_alias(name, "champion").version) == better["version"]
    assert client.get_model_version(name, better["version"]).tags["gate.champion_version"] == champion


# --------------------------------------------------------------------------- a consumer without the repository

CONSUMER = textwrap.dedent(
    """
    import importlib.util, io, json, sys
    # a consumer's environment: this repository is neither on sys.path nor installed (drop the editable finder)
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__ and "editable" not in getattr(f, "__module__", "")]
    sys.path[:] = [p for p in sys.path if p and (not p.startswith(REPO) or p.startswith(REPO + "/.venv/"))]
    assert importlib.util.find_spec("components") is None, "components must not be importable before loading"
    import mlflow, numpy as np, pandas as pd
    from PIL import Image
    mlflow.set_tracking_uri(URI)

    def png(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    out = {}
    for name in NAMES:
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        one = model.predict(pd.DataFrame({"image": [png(0)]}))
        five = model.predict(pd.DataFrame({"image": [png(1), png(2), np.zeros((30, 20, 3), np.uint8), png(3), png(4)]}))
        out[name] = {"n1": len(one), "n5": len(five), "columns": list(five.columns), "row": json.loads(five.iloc[2].to_json())}
    import components
    out["components_file"] = components.__file__
    print("RESULT" + json.dumps(out))
    """
)


def test_consumer_without_repository_loads_champions(registry_store, tmp_path):
    _, uri, _, _ = registry_store
    names = ["visionflow-backbone", "visionflow-classifier", "visionflow-detector-yolo", "visionflow-segmenter-fcn"]
    script = f"REPO = {str(REPO)!r}\nURI = {uri!r}\nNAMES = {names!r}\n" + CONSUMER
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert not result["components_file"].startswith(str(REPO))  # the model's own copy of the code
    for name in names:
        assert result[name]["n1"] == 1 and result[name]["n5"] == 5
    assert len(result["visionflow-backbone"]["row"]["embedding"]) == 128  # convnet_small's last stage, pooled
    assert {"label", "score", "probabilities"} <= set(result["visionflow-classifier"]["columns"])
    assert result["visionflow-classifier"]["row"]["label"] in ("ants", "bees")
    assert {"boxes", "labels", "scores"} <= set(result["visionflow-detector-yolo"]["columns"])
    assert set(result["visionflow-detector-yolo"]["row"]["labels"]) <= {"circle", "square"}
    mask = np.asarray(result["visionflow-segmenter-fcn"]["row"]["mask"])
    assert mask.shape == (30, 20) and mask.max() <= 2  # the input's own size, class indices 0..K


def test_predict_files_with_registry_uri_and_checkpoint(registry_store, tmp_path, monkeypatch):
    from components.errors import DataError
    from components.stages.predict import predict_files

    _, uri, work, _ = registry_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    images = []
    for i in range(2):
        path = tmp_path / f"im{i}.png"
        path.write_bytes(png_bytes(seed=i))
        images.append(path)
    via_registry = predict_files("models:/visionflow-detector-yolo@champion", images, out=tmp_path / "pred.json", draw=tmp_path / "drawn")
    via_checkpoint = predict_files(str(work / "outputs/detect/yolo/best.pt"), images, out=None, draw=None)
    results = json.loads((tmp_path / "pred.json").read_text())  # COCO results of both images
    assert via_registry["predicted"] == 2 and {r["image_id"] for r in results} == {1, 2}
    assert len(list((tmp_path / "drawn").glob("*.png"))) == 2
    for path in images:  # the registry and the checkpoint give the same answer, to the bit
        assert via_registry["predictions"][path.name] == via_checkpoint["predictions"][path.name]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = predict_files(str(work / "outputs/detect/yolo/best.pt"), [bad, images[0]], out=None, draw=None)  # reported, not raised
    assert "bad.png" in result["failed"]["bad.png"] and "not an image" in result["failed"]["bad.png"]
    assert list(result["predictions"]) == ["im0.png"]
    with pytest.raises(DataError, match="missing.png"):
        predict_files(str(work / "outputs/detect/yolo/best.pt"), [tmp_path / "missing.png"])
