"""Classifiers (convnet from scratch, backbone + head) and the classification metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from components.config import TrainConfig
from components.engine import build_optimizer, load_model, save_checkpoint
from components.metrics.classification import ClassificationMetrics, evaluate_classification
from components.models.registry import get_model, list_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGENET_FILE = Path(torch.hub.get_dir()) / "checkpoints" / "mobilenet_v2-b0353104.pth"




def _batch(n: int = 8, k: int = 4, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.arange(n) % k


@pytest.mark.parametrize("name", list_models("classification"))
def test_every_classifier_overfits_a_tiny_batch(name):
    torch.manual_seed(0)
    model = get_model("classification", name, num_classes=4)
    x, y = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model(x).shape == (8, 4)
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("name", list_models("classification"))
def test_timm_style_api(name):
    model = get_model("classification", name, num_classes=3).eval()
    x, _ = _batch(2, 3)
    feats = model.forward_features(x)
    assert feats.ndim == 4 and feats.shape[0] == 2
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.get_classifier().in_features)
    assert torch.allclose(model.forward_head(feats), model(x))
    probs = model.predict_proba(x)
    assert torch.allclose(probs.sum(1), torch.ones(2)) and (probs >= 0).all()
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7


def _sgd_step(model, lr=0.1, groups=None):
    cfg = TrainConfig(optimizer="sgd", lr=lr, momentum=0.0, weight_decay=0.0)
    opt = build_optimizer(model, cfg, groups)
    x, y = _batch(4, 2)
    model.train()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_feature_extraction_keeps_the_backbone_bit_identical():
    torch.manual_seed(0)
    model = get_model("classification", "classifier", num_classes=2, backbone="mobilenet_v2", trainable_layers=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _sgd_step(model)
    after = model.state_dict()
    backbone = [k for k in before if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)  # BatchNorm statistics are part of the check
    assert all(torch.equal(before[k], after[k]) for k in backbone)
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])


def test_fine_tuning_last_k_blocks_only():
    torch.manual_seed(0)
    model = get_model("classification", "classifier", num_classes=2, backbone="convnet_small", trainable_layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _sgd_step(model)
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("backbone.stages.0.", "backbone.stages.1.", "backbone.stages.2."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["backbone.stages.3.0.0.weight"], after["backbone.stages.3.0.0.weight"])


def test_frozen_bn_keeps_statistics_while_weights_train():
    torch.manual_seed(0)
    model = get_model("classification", "classifier", num_classes=2, backbone="convnet_small", frozen_bn=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _sgd_step(model)
    after = model.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert not torch.equal(before["backbone.stages.0.0.0.weight"], after["backbone.stages.0.0.0.weight"])


def test_backbone_learning_rate_is_lower_in_the_actual_update():
    """With plain SGD the update is lr * grad: the backbone's must be backbone_lr_mult x the head's rate."""
    torch.manual_seed(0)
    model = get_model("classification", "classifier", num_classes=2, backbone="convnet_small")
    probe = get_model("classification", "classifier", num_classes=2, backbone="convnet_small")
    probe.load_state_dict(model.state_dict())
    x, y = _batch(4, 2)
    probe.train()
    F.cross_entropy(probe(x), y).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _sgd_step(model, lr=0.1, groups=model.param_groups(backbone_lr_mult=0.1))
    for name, p in model.named_parameters():
        grad = dict(probe.named_parameters())[name].grad
        rate = 0.01 if name.startswith("backbone.") else 0.1
        assert torch.allclose(before[name] - p.detach(), rate * grad, atol=1e-7), name


@pytest.mark.skipif(not IMAGENET_FILE.exists(), reason="ImageNet weights not in torchvision's cache (scripts/seed_weights.sh)")
def test_imagenet_backbone_matches_torchvision():
    import torchvision

    model = get_model("classification", "classifier", num_classes=1000, backbone="mobilenet_v2", weights="IMAGENET1K_V1").eval()
    reference = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    model.get_classifier().load_state_dict(reference.classifier[1].state_dict())
    x, _ = _batch(2, 2, size=64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), reference((x - mean) / std), atol=1e-4)  # the model normalises its [0, 1] input


def test_checkpoint_round_trip_predicts_any_batch_size(tmp_path):
    torch.manual_seed(0)
    model = get_model("classification", "classifier", num_classes=3, backbone="convnet_small", trainable_layers=0).eval()
    args = {"num_classes": 3, "backbone": "convnet_small", "weights": None, "trainable_layers": 0}
    path = save_checkpoint(tmp_path / "m.pt", {"task": "classification", "model_name": "classifier", "model_args": args,
                                               "state_dict": model.state_dict(), "categories": ["a", "b", "c"]})
    loaded, ckpt = load_model(path)
    assert ckpt["categories"] == ["a", "b", "c"]
    for n in (1, 5):
        x, _ = _batch(n, 3)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        assert loaded.predict_proba(x).shape == (n, 3)


def test_checkpoints_of_the_old_backbone_name_still_load(tmp_path):
    """``vfnet_small`` was renamed ``convnet_small``: files written before the rename keep loading."""
    from components.models.backbones import build_backbone, load_backbone_state

    torch.manual_seed(0)
    model = get_model("classification", "classifier", num_classes=3, backbone="convnet_small").eval()
    args = {"num_classes": 3, "backbone": "vfnet_small", "weights": None}  # as a pre-rename stage wrote it
    path = save_checkpoint(tmp_path / "old.pt", {"task": "classification", "model_name": "classifier", "model_args": args,
                                                 "state_dict": model.state_dict(), "categories": ["a", "b", "c"],
                                                 "backbone_arch": "vfnet_small"})
    loaded, _ = load_model(path)
    x, _ = _batch(2, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for arch in ("convnet_small", "vfnet_small"):  # new params on an old file, old params on it too
        assert set(load_backbone_state(path, arch=arch)) == set(model.backbone.state_dict())
        assert build_backbone(arch, weights=str(path)).arch == "convnet_small"
    assert "vfnet_small" not in list_models("backbone")


# --------------------------------------------------------------------------- metrics


def test_metrics_match_sklearn_and_accumulate():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (200,), generator=g)
    logits = torch.randn(200, 4, generator=g) + 1.5 * F.one_hot(targets, 4)
    preds = logits.argmax(1)
    metric = ClassificationMetrics(4, ["a", "b", "c", "d"])
    for chunk in range(0, 200, 37):  # uneven batches
        metric.update(logits[chunk : chunk + 37], targets[chunk : chunk + 37])
    out = metric.compute()
    assert out["accuracy"] == pytest.approx(accuracy_score(targets, preds))
    assert out["macro_f1"] == pytest.approx(f1_score(targets, preds, average="macro"))
    assert list(out["per_class_accuracy"].values()) == pytest.approx(list(recall_score(targets, preds, average=None)))
    assert out["confusion_matrix"] == confusion_matrix(targets, preds).tolist()
    assert out["num_samples"] == 200
    metric.reset()
    assert metric.compute()["num_samples"] == 0


def test_macro_f1_ignores_classes_absent_from_targets_and_predictions():
    from sklearn.metrics import f1_score

    targets = torch.tensor([0, 0, 1, 1, 1])
    preds = torch.tensor([0, 1, 1, 1, 0])
    metric = ClassificationMetrics(5)
    metric.update(preds, targets)
    assert metric.compute()["macro_f1"] == pytest.approx(f1_score(targets, preds, average="macro"))
    with pytest.raises(ValueError, match="0..4"):
        metric.update(torch.tensor([5]), torch.tensor([0]))


def test_evaluate_classification_reports_loss_and_metrics():
    torch.manual_seed(0)
    model = get_model("classification", "convnet", num_classes=2).eval()
    x, y = _batch(6, 2)
    out = evaluate_classification(model, [(x[:4], y[:4]), (x[4:], y[4:])], torch.device("cpu"), class_names=["p", "q"])
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y).item()
    assert out["loss"] == pytest.approx(expected, rel=1e-5) and out["num_samples"] == 6
