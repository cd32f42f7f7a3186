"""Optimiser and per-step learning-rate schedule: SGD/AdamW, no decay on biases and norms, warm-up then cosine or step."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from components.config import TrainConfig
from components.errors import TrainingError


def _split_decay(params: Iterable[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Weights of conv/linear layers decay; biases and norm scales (ndim < 2) do not (nanoGPT, timm)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: TrainConfig, param_groups: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov off) or AdamW over the trainable parameters.

    Args:
        model: parameters with ``requires_grad=False`` (frozen backbone stages) are left out.
        cfg: ``optimizer``, ``lr``, ``weight_decay``, ``momentum``.
        param_groups: optional ``[{"params": [...], "lr_mult": 0.1}, {"params": [...]}]``: each
            group's learning rate is ``cfg.lr * lr_mult`` (or an explicit ``"lr"``), e.g. the
            fine-tuning recipe's lower learning rate for the backbone than for the new head.

    Raises:
        TrainingError: nothing is trainable.
    """
    groups: list[dict[str, Any]] = []
    sources = param_groups if param_groups is not None else [{"params": list(model.parameters())}]
    for group in sources:
        lr = float(group.get("lr", cfg.lr * float(group.get("lr_mult", 1.0))))
        decay, no_decay = _split_decay(group["params"])
        name = group.get("name", f"group{len(groups) // 2}")
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay, "name": f"{name}"})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}.no_decay"})
    if not groups:
        raise TrainingError("no trainable parameters", record="param_groups", fix="unfreeze at least the head (trainable_layers / requires_grad)")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warm-up from ``1/warmup_steps`` to 1, then cosine decay to 0 at ``total_steps``
    (``0.5 * (1 + cos(pi * t))``, t the fraction of post-warm-up steps done), or a step decay by
    ``gamma`` every ``step_size`` epochs, or constant.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.scheduler == "cosine":
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    if cfg.scheduler == "step":
        return cfg.gamma ** ((step // max(1, steps_per_epoch)) // cfg.step_size)
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, steps_per_epoch: int, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` over ``cfg.epochs * steps_per_epoch`` steps (see :func:`lr_factor`).

    The lambda is a closure, which ``LambdaLR.state_dict`` does not store: a resumed run rebuilds
    it from the *current* ``cfg.epochs``, so resuming with a larger epoch count extends the schedule.

    Args:
        start_step: optimiser steps already taken (resume); the groups must then carry
            ``initial_lr``, as a restored optimiser state does.
    """
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total, warmup_steps=warmup, cfg=cfg, steps_per_epoch=steps_per_epoch)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)

