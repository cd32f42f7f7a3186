"""The pretrain and finetune stages end to end on a tiny ingested ImageFolder (real files, real MLflow store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from components.config import AugmentConfig, DataConfig, FinetuneConfig, PretrainConfig
from components.engine import load_checkpoint, load_model
from components.errors import DataError, TrainingError
from components.models.backbones import build_backbone, load_backbone_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGENET_FILE = Path(torch.hub.get_dir()) / "checkpoints" / "mobilenet_v2-b0353104.pth"
needs_imagenet = pytest.mark.skipif(not IMAGENET_FILE.exists(), reason="ImageNet weights not in torchvision's cache")
TINY = {"batch_size": 8, "lr": 3e-3, "threads": 1, "device": "cpu"}




@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory, mlflow_db_template):
    """One sqlite MLflow store for the module, a copy of the session's migrated one (migrations cost ~10 s on a busy CPU)."""
    import shutil

    root = tmp_path_factory.mktemp("mlflow")
    shutil.copy(mlflow_db_template, root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("VISIONFLOW_PARENT_RUN_ID", raising=False)
        yield {"uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": (root / "mlartifacts").as_uri()}


@pytest.fixture()
def tracking_cfg(tracking_store, request):
    """A TrackingConfig on the module's store, one experiment per test."""
    from components.config import TrackingConfig

    return TrackingConfig(experiment=request.node.name[:200], **tracking_store)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 2-class ImageFolder (red-ish vs blue-ish 40x30 photos, JPEG), ingested like the real ones."""
    from components.data.ingest import ingest

    src = tmp_path_factory.mktemp("src")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("val", 6)):
        for c, name in enumerate(("ants", "bees")):
            folder = src / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                base = torch.tensor([200, 60, 40] if c == 0 else [40, 60, 200], dtype=torch.float32)
                pixels = (base + 40 * torch.randn(30, 40, 3, generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.jpg", quality=90)
    out = tmp_path_factory.mktemp("data") / "tiny"
    ingest(f"imagefolder:{src}", out, cfg=DataConfig())
    return out


def _pretrain_cfg(dataset: Path, tmp: Path, **train) -> PretrainConfig:
    return PretrainConfig(dataset=str(dataset), image_size=16, out=str(tmp / "outputs/pretrain"), train={**TINY, "epochs": 2, **train})


def _finetune_cfg(dataset: Path, tmp: Path, strategies: list[str], **kw) -> FinetuneConfig:
    train = {**TINY, "epochs": 2, **kw.pop("train", {})}
    return FinetuneConfig(
        dataset=str(dataset), image_size=32, own_image_size=16, strategies=strategies, out=str(tmp / "outputs/finetune"),
        own_backbone=str(tmp / "outputs/pretrain/backbone.pt"), unfreeze_last_k=1, train=train, **kw,
    )


def _runs(tracking_cfg, name: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_cfg.uri)
    return mlflow.search_runs(experiment_names=[tracking_cfg.experiment], filter_string=f"attributes.run_name = '{name}'", output_format="list")


@needs_imagenet
def test_pretrain_then_finetune_all_strategies(tiny_dataset, tmp_path, tracking_cfg, monkeypatch):
    from components.stages.finetune import run_finetune
    from components.stages.pretrain import run_pretrain

    monkeypatch.chdir(tmp_path)
    pre = run_pretrain(_pretrain_cfg(tiny_dataset, tmp_path, epochs=1), AugmentConfig(), tracking_cfg)
    backbone_pt = tmp_path / "outputs/pretrain/backbone.pt"
    assert pre["checkpoint"] == str(backbone_pt) and pre["epochs"] == 1 and 0.0 <= pre["accuracy"] <= 1.0
    state = json.loads((tmp_path / ".visionflow/stages/pretrain.json").read_text())  # the run id: beside, not inside, the checkpoint
    assert state["mlflow_run_id"] == pre["run_id"] and "mlflow_run_id" not in load_checkpoint(tmp_path / "outputs/pretrain/train/last.pt")
    assert json.loads((tmp_path / "metrics/pretrain.json").read_text())["run_id"] == pre["run_id"]
    assert (tmp_path / "outputs/pretrain/training_curves.png").stat().st_size > 0
    state = load_backbone_state(backbone_pt, arch="convnet_small")
    assert state and not any(k.startswith(("backbone.", "head.")) for k in state)
    build_backbone("convnet_small", weights=str(backbone_pt))  # the path other stages put in params
    history = _runs(tracking_cfg, "pretrain")[0].data.metrics
    assert {"train_loss", "val_accuracy", "best_accuracy"} <= set(history)

    strategies = ["scratch", "feature_extraction", "fine_tuning", "own_fine_tuning"]
    result = run_finetune(_finetune_cfg(tiny_dataset, tmp_path, strategies, train={"epochs": 1}), AugmentConfig(), tracking_cfg)
    on_disk = json.loads((tmp_path / "metrics/finetune.json").read_text())
    assert on_disk["best"] == result["best"] and list(on_disk["strategies"]) == strategies
    for name, row in on_disk["strategies"].items():
        assert {"accuracy", "macro_f1", "per_class_accuracy", "train_time_s", "confusion_matrix"} <= set(row), name
        assert sum(map(sum, row["confusion_matrix"])) == on_disk["num_val"] == 12
    assert on_disk["strategies"]["own_fine_tuning"]["image_size"] == 16
    rows = on_disk["strategies"]
    assert rows["feature_extraction"]["trainable_params"] < rows["fine_tuning"]["trainable_params"] < rows["scratch"]["trainable_params"]
    best = json.loads((tmp_path / "outputs/finetune/best.json").read_text())
    assert best["strategy"] == result["best"]["strategy"] and Path(best["checkpoint"]).is_file()
    for png in ("strategies.png", "confusion_matrix.png", "fine_tuning/training_curves.png", "scratch/confusion_matrix.png"):
        assert (tmp_path / "outputs/finetune" / png).stat().st_size > 0

    model, ckpt = load_model(best["checkpoint"])  # rebuilt from the file alone
    assert ckpt["categories"] == ["ants", "bees"] and ckpt["strategy"] == best["strategy"]
    size = ckpt["image_size"]
    for n in (1, 5):
        probs = model.predict_proba(torch.rand(n, 3, size, size))
        assert probs.shape == (n, 2) and torch.allclose(probs.sum(1), torch.ones(n))
    children = {r.info.run_name: r for r in _runs(tracking_cfg, "finetune.fine_tuning")}
    assert children["finetune.fine_tuning"].data.tags["mlflow.parentRunId"] == result["run_id"]
    for path in (tmp_path / "outputs").rglob("*.pt"):  # every checkpoint the stages wrote is weights_only-safe
        assert torch.load(path, map_location="cpu", weights_only=True)["model_name"] == "classifier"


@pytest.mark.parametrize("eval_crop", [0.875, None])
def test_finetune_validates_as_its_checkpoint_is_served(tiny_dataset, tmp_path, tracking_cfg, monkeypatch, eval_crop):
    """The stage's val images reach the network as the served checkpoint's do (ImagePredictor on the files, eval_crop or squash)."""
    from components.data.datasets import ClassificationDataset, read_image
    from components.stages.finetune import run_finetune
    from components.stages.predict import ImagePredictor
    from components.stages.pretrain import load_classification_data

    monkeypatch.chdir(tmp_path)
    result = run_finetune(_finetune_cfg(tiny_dataset, tmp_path, ["scratch"], eval_crop=eval_crop, train={"epochs": 1}), AugmentConfig(), tracking_cfg)
    assert result["eval_crop"] == eval_crop
    predictor = ImagePredictor.from_checkpoint(result["strategies"]["scratch"]["checkpoint"], device="cpu")
    assert predictor.eval_crop == eval_crop and predictor.image_size == 32
    decoded = load_classification_data(tiny_dataset, AugmentConfig(), image_size=32)
    stage_val, other_val = (decoded.at_size(32, crop).val for crop in (eval_crop, 0.5 if eval_crop else 0.875))
    files = [path for path, _ in ClassificationDataset(tiny_dataset, "val").samples]
    served = predictor.predict([Path(f).read_bytes() for f in files])
    assert len(served) == len(stage_val) == 12
    with torch.no_grad():
        for i, record in enumerate(served):
            x, _ = stage_val[i]
            assert torch.equal(x, predictor._prepare(read_image(files[i])))  # the 40 x 30 photos: no cache downscale, same ops
            probs = torch.softmax(predictor.model(x[None]), 1)[0]
            torch.testing.assert_close(torch.tensor(record["probabilities"], dtype=probs.dtype), probs, atol=1e-5, rtol=0)
            assert not torch.equal(other_val[i][0], x)  # another evaluation transform gives other pixels: the check can fail


def test_finetune_resume_logs_into_the_same_run_and_extends(tiny_dataset, tmp_path, tracking_cfg, monkeypatch):
    from components.stages.finetune import run_finetune

    monkeypatch.chdir(tmp_path)
    first = run_finetune(_finetune_cfg(tiny_dataset, tmp_path, ["scratch"], imagenet_backbone={"arch": "convnet_small"}, train={"epochs": 1}), AugmentConfig(), tracking_cfg)
    again = run_finetune(_finetune_cfg(tiny_dataset, tmp_path, ["scratch"], imagenet_backbone={"arch": "convnet_small"}, train={"epochs": 2}), AugmentConfig(), tracking_cfg, resume=True)
    assert again["run_id"] == first["run_id"]
    assert again["strategies"]["scratch"]["run_id"] == first["strategies"]["scratch"]["run_id"]
    assert again["strategies"]["scratch"]["epochs"] == 2
    import mlflow

    steps = [m.step for m in mlflow.MlflowClient(tracking_cfg.uri).get_metric_history(first["strategies"]["scratch"]["run_id"], "val_accuracy")]
    assert steps == [1, 2]


def test_nan_loss_fails_the_stage_and_nothing_can_be_registered(tiny_dataset, tmp_path, tracking_cfg, monkeypatch):
    import components.stages.pretrain as pretrain
    from components.config import Params
    from components.stages.finetune import run_finetune
    from components.stages.register import discover_candidates, refusal

    monkeypatch.chdir(tmp_path)

    def diverging(model, batch, device):
        out = pretrain_step(model, batch, device)
        return {**out, "loss": out["loss"] * float("nan")}

    pretrain_step = pretrain.classification_step
    monkeypatch.setattr(pretrain, "classification_step", diverging)
    cfg = _finetune_cfg(tiny_dataset, tmp_path, ["scratch"], imagenet_backbone={"arch": "convnet_small"})
    with pytest.raises(TrainingError, match=r"finetune\.scratch epoch 1 step 1"):
        run_finetune(cfg, AugmentConfig(), tracking_cfg)
    assert not (tmp_path / "outputs/finetune/best.json").exists()
    assert not (tmp_path / "outputs/finetune/scratch/best.pt").exists()
    assert (tmp_path / "outputs/finetune/scratch/diverged.json").exists()
    assert _runs(tracking_cfg, "finetune.scratch")[0].info.status == "FAILED"
    params = Params(finetune=cfg)
    candidate = next(c for c in discover_candidates(params, metrics_dir=tmp_path / "metrics") if c.kind == "classifier")
    assert refusal(candidate, params.register.classifier) is not None


PRETRAIN_SCRIPT = """
import sys
from components.config import AugmentConfig, PretrainConfig, TrackingConfig
from components.stages.pretrain import run_pretrain
run_pretrain(PretrainConfig.model_validate_json(sys.argv[1]), AugmentConfig(), TrackingConfig.model_validate_json(sys.argv[2]))
"""


def test_pretrain_twice_in_two_workspaces_writes_identical_files(tiny_dataset, tmp_path, tracking_cfg):
    """Issue 13: the out folder is a function of code, data and params; run ids and timings live beside it."""
    import os
    import subprocess
    import sys

    from components.data.versioning import dvc_directory_md5

    cfg = PretrainConfig(dataset="data/tiny", image_size=16, out="outputs/pretrain", train={**TINY, "epochs": 2, "max_steps_per_epoch": 2})
    root = Path(__file__).resolve().parents[1]
    workspaces, procs = [], []  # the module's store is migrated already (tracking_store): the two processes only log
    for name, hash_seed in (("a", "1"), ("b", "2")):  # two processes at once, two clean workspaces, different str hashing
        work = tmp_path / name
        (work / "data").mkdir(parents=True)
        (work / "data" / "tiny").symlink_to(tiny_dataset, target_is_directory=True)
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(root)}
        env.pop("MLFLOW_TRACKING_URI", None)
        procs.append(subprocess.Popen(
            [sys.executable, "-c", PRETRAIN_SCRIPT, cfg.model_dump_json(), tracking_cfg.model_dump_json()],
            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
        workspaces.append(work)
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        assert "\r" not in stderr and "pretrain epoch 2/2: loss " in stderr  # piped: one line per epoch
    files = [{p.relative_to(w / "outputs/pretrain"): p.read_bytes() for p in sorted((w / "outputs/pretrain").rglob("*")) if p.is_file()} for w in workspaces]
    assert sorted(map(str, files[0])) == ["backbone.pt", "train/best.pt", "train/last.pt", "training_curves.png"]
    assert list(files[0]) == list(files[1])
    assert [str(name) for name in files[0] if files[0][name] != files[1][name]] == []
    ckpt = load_checkpoint(workspaces[0] / "outputs/pretrain/backbone.pt")
    assert ckpt["dataset"] == {"path": "data/tiny", "md5": dvc_directory_md5(tiny_dataset)} and ckpt["categories"] == ["ants", "bees"]
    states = [json.loads((w / ".visionflow/stages/pretrain.json").read_text()) for w in workspaces]
    metrics = [json.loads((w / "metrics/pretrain.json").read_text()) for w in workspaces]
    assert states[0]["mlflow_run_id"] != states[1]["mlflow_run_id"]
    assert [s["mlflow_run_id"] for s in states] == [m["run_id"] for m in metrics]
    assert len(states[0]["fit"]["epoch_time_s"]) == 2 and metrics[0]["train_time_s"] >= 0


def test_pretrain_resume_continues_last_pt_in_the_same_run(tiny_dataset, tmp_path, tracking_cfg, monkeypatch):
    import components.stages.pretrain as pretrain

    monkeypatch.chdir(tmp_path)
    cfg = _pretrain_cfg(tiny_dataset, tmp_path, epochs=2, max_steps_per_epoch=2)
    straight = pretrain.run_pretrain(cfg, AugmentConfig(), tracking_cfg)
    expected = (tmp_path / "outputs/pretrain/backbone.pt").read_bytes()

    calls = {"n": 0}
    step = pretrain.classification_step

    def dies_in_epoch_two(model, batch, device):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed mid-epoch after epoch 1 was checkpointed
        return step(model, batch, device)

    monkeypatch.setattr(pretrain, "classification_step", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run_pretrain(cfg, AugmentConfig(), tracking_cfg)
    failed_run = json.loads((tmp_path / ".visionflow/stages/pretrain.json").read_text())["mlflow_run_id"]
    assert failed_run != straight["run_id"] and load_checkpoint(tmp_path / "outputs/pretrain/train/last.pt")["epoch"] == 1
    monkeypatch.setattr(pretrain, "classification_step", step)
    resumed = pretrain.run_pretrain(cfg, AugmentConfig(), tracking_cfg, resume=True)
    assert resumed["run_id"] == failed_run and resumed["epochs"] == 2
    assert (tmp_path / "outputs/pretrain/backbone.pt").read_bytes() == expected  # same weights as the straight run
    import mlflow

    steps = [m.step for m in mlflow.MlflowClient(tracking_cfg.uri).get_metric_history(failed_run, "val_accuracy")]
    assert steps == [1, 2]


@needs_imagenet
def test_pretrain_imagenet_source_is_torchvision_classifier(tmp_path, tracking_cfg, monkeypatch):
    import torchvision

    from components.stages.pretrain import run_pretrain

    monkeypatch.chdir(tmp_path)
    cfg = PretrainConfig(source="imagenet", backbone={"arch": "mobilenet_v2", "weights": "IMAGENET1K_V1"}, out=str(tmp_path / "pre"))
    metrics = run_pretrain(cfg, AugmentConfig(), tracking_cfg)
    assert metrics["accuracy"] == pytest.approx(0.71878)  # torchvision's published acc@1 of these weights
    model, ckpt = load_model(tmp_path / "pre/backbone.pt")
    assert len(ckpt["categories"]) == 1000 and ckpt["backbone_arch"] == "mobilenet_v2"
    reference = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    x = torch.rand(2, 3, 64, 64)
    norm = torchvision.transforms.v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        assert torch.allclose(model(x), reference(norm(x)), atol=1e-4)
    assert build_backbone("mobilenet_v2", weights=str(tmp_path / "pre/backbone.pt")).out_channels == 1280


def test_label_budget_is_stratified_and_seeded():
    from components.stages.pretrain import label_budget

    targets = [0] * 50 + [1] * 30 + [2] * 3
    picked = label_budget(targets, 0.1, seed=0)
    assert [sum(targets[i] == c for i in picked) for c in range(3)] == [5, 3, 1]
    assert picked == label_budget(targets, 0.1, seed=0) != label_budget(targets, 0.1, seed=1)
    assert label_budget(targets, 1.0, seed=0) == list(range(83))


def test_missing_dataset_is_a_clear_error(tmp_path, tracking_cfg, monkeypatch):
    from components.stages.pretrain import run_pretrain

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="visionflow ingest"):
        run_pretrain(_pretrain_cfg(tmp_path / "nowhere", tmp_path), AugmentConfig(), tracking_cfg)
