"""The training engine: exact resume, schedule, NaN guard, early stopping, checkpoints, param groups."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from tiny_data import NoisyColours
from torch import nn

from components.config import TrainConfig
from components.engine import (
    build_loader,
    build_optimizer,
    fit,
    load_checkpoint,
    load_model,
    lr_factor,
    resolve_device,
    save_checkpoint,
    seed_everything,
)
from components.errors import CheckpointError, ConfigError, TrainingError
from components.metrics.classification import evaluate_classification
from components.models.classifier import classification_step
from components.models.registry import get_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ["red", "blue"]


META = {"task": "classification", "model_name": "convnet", "model_args": {"num_classes": 2, "widths": [8, 16], "hidden": 16}, "categories": CLASSES}




def _cfg(**kw) -> TrainConfig:
    base = {"epochs": 4, "batch_size": 8, "lr": 1e-2, "device": "cpu", "seed": 0, "warmup_epochs": 0.5}
    return TrainConfig(**{**base, **kw})


def _run(tmp: Path, cfg: TrainConfig, *, resume: bool = False, step=classification_step, logs=None):
    seed_everything(cfg.seed)
    model = get_model("classification", "convnet", **META["model_args"])  # dropout > 0: uses the RNG
    ds = NoisyColours()
    result = fit(
        model,
        train_loader=build_loader(ds, cfg, train=True),
        val_loader=build_loader(ds, cfg, train=False),
        step=step,
        evaluate=partial(evaluate_classification, class_names=CLASSES),
        cfg=cfg,
        out_dir=tmp,
        meta=META,
        resume=resume,
        log_metrics=None if logs is None else (lambda m, s: logs.append((s, dict(m)))),
        desc="test",
    )
    return model, result


class Interrupt(Exception):
    pass


def _interrupting_step(at: int):
    calls = {"n": 0}

    def step(model, batch, device):
        calls["n"] += 1
        if calls["n"] == at:
            raise Interrupt  # a crash in the middle of an epoch, after some epochs were checkpointed
        return classification_step(model, batch, device)

    return step


@pytest.mark.parametrize(
    "schedule",
    [{}, {"scheduler": "step", "step_size": 1, "gamma": 0.5, "warmup_epochs": 1.5, "optimizer": "sgd"}],
    ids=["cosine-adamw", "step-warmup-sgd"],
)
def test_resume_after_interruption_gives_the_same_weights(tmp_path, schedule):
    straight, r1 = _run(tmp_path / "straight", _cfg(**schedule))
    with pytest.raises(Interrupt):
        _run(tmp_path / "resumed", _cfg(**schedule), step=_interrupting_step(at=6 * 2 + 3))  # 6 steps/epoch: dies in epoch 3
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    resumed, r2 = _run(tmp_path / "resumed", _cfg(**schedule), resume=True)
    assert r2.epochs_completed == 4 and r2.global_step == r1.global_step == 24
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [h["val"]["accuracy"] for h in r1.history] == [h["val"]["accuracy"] for h in r2.history]
    assert [h["lr"] for h in r1.history] == [h["lr"] for h in r2.history]
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["scheduler"] == b["scheduler"] and a["scheduler"]["_step_count"] == 25  # restored, not rebuilt from scratch
    # everything is restored (weights, optimiser, scheduler, RNG, history): the very same files
    for name in ("best.pt", "last.pt"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_a_checkpoint_is_a_function_of_its_inputs_and_timings_go_to_the_state_file(tmp_path, capsys):
    _run(tmp_path / "a", _cfg(epochs=2))
    _run(tmp_path / "b", _cfg(epochs=2))
    for name in ("best.pt", "last.pt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    last = load_checkpoint(tmp_path / "a" / "last.pt")
    assert "train_time_s" not in last and all("time_s" not in h for h in last["history"])

    state = tmp_path / "state" / "test.json"
    seed_everything(0)
    cfg = _cfg(epochs=2)
    model = get_model("classification", "convnet", **META["model_args"])
    ds = NoisyColours()
    kwargs = dict(train_loader=build_loader(ds, cfg, train=True), val_loader=build_loader(ds, cfg, train=False), step=classification_step,
                  evaluate=partial(evaluate_classification, class_names=CLASSES), out_dir=tmp_path / "c", meta=META, desc="test", state_file=state)
    first = fit(model, cfg=cfg, **kwargs)
    recorded = json.loads(state.read_text())["fit"]
    assert recorded["epoch"] == 2 and recorded["epoch_time_s"] == first.epoch_time_s and first.train_time_s == pytest.approx(sum(first.epoch_time_s))
    longer = fit(model, cfg=_cfg(epochs=3), resume=True, **kwargs)  # the earlier session's times are read back
    assert longer.epoch_time_s[:2] == first.epoch_time_s and len(longer.epoch_time_s) == 3
    assert (tmp_path / "c" / "last.pt").read_bytes() != (tmp_path / "a" / "last.pt").read_bytes()

    # not a terminal (pytest captures stderr): one plain line per epoch, no carriage returns
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("test epoch")]
    assert len(lines) == 2 + 2 + 2 + 1 and "\r" not in err
    assert lines[0].startswith("test epoch 1/2: loss ") and " lr " in lines[0] and "img/s" in lines[0] and "val accuracy " in lines[0]


def test_resume_with_more_epochs_extends_the_cosine_schedule(tmp_path):
    _, short = _run(tmp_path, _cfg(epochs=2, warmup_epochs=0))
    assert short.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reached 0 at the old end
    model, longer = _run(tmp_path, _cfg(epochs=4, warmup_epochs=0), resume=True)
    assert longer.epochs_completed == 4 and len(longer.history) == 4
    steps = 6 * 4
    expected = 1e-2 * 0.5 * (1 + math.cos(math.pi * 18 / steps))  # lr after epoch 3 on the 4-epoch cosine
    assert longer.history[2]["lr"] == pytest.approx(expected, rel=1e-9)
    assert longer.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_lr_schedule_warmup_cosine_and_step():
    cfg = _cfg(scheduler="cosine")
    f = partial(lr_factor, total_steps=100, warmup_steps=10, cfg=cfg, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    cfg = _cfg(scheduler="step", step_size=2, gamma=0.1)
    g = partial(lr_factor, total_steps=100, warmup_steps=0, cfg=cfg, steps_per_epoch=10)
    assert [g(s) for s in (0, 19, 20, 39, 40)] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])


def test_loss_falls_and_checkpoints_load_weights_only(tmp_path):
    logs: list = []
    _, result = _run(tmp_path, _cfg(epochs=6, early_stopping={"monitor": "accuracy", "mode": "max", "patience": 10}), logs=logs)
    assert result.history[-1]["train_loss"] < 0.7 * result.history[0]["train_loss"]
    assert [s for s, _ in logs] == [1, 2, 3, 4, 5, 6] and "val_accuracy" in logs[0][1] and "train_loss" in logs[0][1]
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(tmp_path / name, map_location="cpu", weights_only=True)
        assert ckpt["task"] == "classification" and ckpt["categories"] == CLASSES
    last = load_checkpoint(tmp_path / "last.pt")
    assert {"optimizer", "scheduler", "rng", "history", "best", "early_stopping"} <= set(last)
    assert last["best"]["value"] == max(h["val"]["accuracy"] for h in result.history)
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files
    model, ckpt = load_model(tmp_path / "best.pt")
    assert ckpt["epoch"] == result.best_epoch
    assert model(torch.rand(5, 3, 12, 12)).shape == (5, 2)


def test_nan_loss_stops_the_stage_and_keeps_nothing_registrable(tmp_path):
    def diverging(model, batch, device):
        out = classification_step(model, batch, device)
        if diverging.calls >= 8:  # epoch 2, after epoch 1 wrote a best.pt
            out["loss"] = out["loss"] * float("nan")
        diverging.calls += 1
        return out

    diverging.calls = 0
    with pytest.raises(TrainingError) as err:
        _run(tmp_path, _cfg(), step=diverging)
    assert "epoch 2" in str(err.value) and "step 9" in str(err.value) and "test" in str(err.value)
    assert not (tmp_path / "best.pt").exists()
    marker = json.loads((tmp_path / "diverged.json").read_text())
    assert marker["epoch"] == 2 and marker["step"] == 9


def test_early_stopping_on_a_named_metric(tmp_path):
    scores = iter([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])

    def evaluate(model, loader, device):
        return {"score": next(scores)}

    cfg = _cfg(epochs=6, early_stopping={"monitor": "score", "mode": "max", "patience": 2})
    ds = NoisyColours(16)
    model = get_model("classification", "convnet", **META["model_args"])
    result = fit(model, train_loader=build_loader(ds, cfg, train=True), val_loader=[None], step=classification_step,
                 evaluate=evaluate, cfg=cfg, out_dir=tmp_path, meta=META)
    assert result.stopped_early and result.epochs_completed == 3 and result.best_epoch == 1
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1

    bad = _cfg(epochs=1, early_stopping={"monitor": "nope"})
    with pytest.raises(ConfigError, match="score"):
        fit(model, train_loader=build_loader(ds, bad, train=True), val_loader=[None], step=classification_step,
            evaluate=lambda model, loader, device: {"score": 1.0}, cfg=bad, out_dir=tmp_path / "b", meta=META)


def test_param_groups_lr_mult_and_frozen_params_are_skipped():
    model = get_model("classification", "classifier", num_classes=3, backbone="convnet_small", trainable_layers=1)
    cfg = _cfg(lr=1e-2, weight_decay=0.05)
    opt = build_optimizer(model, cfg, model.param_groups(backbone_lr_mult=0.1))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["backbone"]["lr"] == pytest.approx(1e-3) and by_name["head"]["lr"] == pytest.approx(1e-2)
    assert by_name["head.no_decay"]["weight_decay"] == 0.0 and by_name["head"]["weight_decay"] == 0.05
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = [p for s in list(model.backbone.stages)[:3] for p in s.parameters()]
    assert frozen and not any(id(p) in in_opt for p in frozen)
    assert all(id(p) in in_opt for p in model.backbone.stages[3].parameters())


def test_seeded_loader_order_depends_on_seed_and_epoch_only():
    from components.engine import _set_epoch

    ds = list(range(20))
    cfg = _cfg(batch_size=20)
    a, b = build_loader(ds, cfg, train=True), build_loader(ds, cfg, train=True)
    torch.manual_seed(123)  # the global RNG must not matter
    _set_epoch(a, 0, 3)
    order_a = next(iter(a)).tolist()
    _set_epoch(b, 0, 3)
    assert next(iter(b)).tolist() == order_a
    _set_epoch(b, 0, 4)
    assert next(iter(b)).tolist() != order_a


def test_checkpoint_errors_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")
    model = get_model("classification", "convnet", num_classes=2)
    other = save_checkpoint(tmp_path / "other.pt", {**META, "state_dict": model.state_dict()})  # widths differ from model_args
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(other)
    with pytest.raises(TypeError, match="plain data"):
        save_checkpoint(tmp_path / "x.pt", {"state_dict": {}, "cfg": object()})


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    _run(tmp_path, _cfg(epochs=1))
    cfg = _cfg(epochs=2)
    model = get_model("classification", "convnet", num_classes=3)
    ds = NoisyColours(16)
    with pytest.raises(CheckpointError, match="last.pt"):
        fit(model, train_loader=build_loader(ds, cfg, train=True), val_loader=None, step=classification_step, evaluate=None,
            cfg=cfg, out_dir=tmp_path, meta={**META, "model_args": {"num_classes": 3}}, resume=True)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device"):
            resolve_device("cuda")


def test_max_steps_per_epoch_and_grad_clip(tmp_path, monkeypatch):
    """Two steps per epoch, and every step's gradient is clipped to ``grad_clip`` before the optimiser sees it."""
    seen, norms = [], []
    clip = nn.utils.clip_grad_norm_

    def step(model: nn.Module, batch, device):
        out = classification_step(model, batch, device)
        seen.append(1)
        return out

    def clip_and_measure(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        before = clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        norms.append((float(before), float(after), max_norm))
        return before

    monkeypatch.setattr(nn.utils, "clip_grad_norm_", clip_and_measure)
    cfg = _cfg(epochs=2, max_steps_per_epoch=2, grad_clip=0.01, optimizer="sgd")
    _, result = _run(tmp_path, cfg, step=step)
    assert len(seen) == 4 and result.global_step == 4
    assert len(norms) == 4 and all(m == 0.01 for _, _, m in norms)
    assert all(before > 0.01 for before, _, _ in norms)  # the clip had something to do
    assert all(after <= 0.01 * 1.001 for _, after, _ in norms)  # and did it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_training_and_exact_resume(tmp_path):
    """On CUDA the engine trains under autocast (bf16, or fp16 + GradScaler kept in last.pt) and resumes exactly."""
    from components.training.runtime import amp_dtype, needs_grad_scaler

    cfg = _cfg(device="cuda", amp=True)
    straight, r1 = _run(tmp_path / "straight", cfg)
    assert next(straight.parameters()).is_cuda
    last = load_checkpoint(tmp_path / "straight" / "last.pt")
    assert last["rng"]["cuda"]
    if needs_grad_scaler(amp_dtype(torch.device("cuda"))):
        assert last["scaler"]["scale"] > 0
    else:
        assert not last["scaler"]  # bfloat16 needs no loss scaling: the scaler is disabled and saves nothing
    assert r1.history[-1]["train_loss"] < r1.history[0]["train_loss"]
    with pytest.raises(Interrupt):
        _run(tmp_path / "resumed", cfg, step=_interrupting_step(at=6 * 2 + 3))
    resumed, _ = _run(tmp_path / "resumed", cfg, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
