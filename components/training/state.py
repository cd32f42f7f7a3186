"""Everything a resume needs, in one object: :class:`TrainingState` with ``state_dict`` / ``load_state_dict``.

``last.pt`` is ``TrainingState.state_dict()``: the model record (what ``best.pt`` holds: meta,
weights, config, epoch, step, metrics, best, early-stopping counter, history) plus optimiser,
scheduler, scaler and every RNG state (python, numpy, torch, CUDA, the sampler generator), all as
data ``torch.load(weights_only=True)`` accepts. An interrupted run restored with
``load_state_dict`` ends with the same weights as a straight run.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.config import TrainConfig
from components.errors import CheckpointError
from components.training.checkpoint import CHECKPOINT_FORMAT
from components.training.optim import build_scheduler
from components.training.runtime import is_distributed, rank, world_size

_RESUME_FIX = "resume with the params that wrote it, or run without --resume"


# --------------------------------------------------------------------------- RNG state as weights_only-safe data


def capture_rng(generator: torch.Generator | None) -> dict[str, Any]:
    """Every RNG state as tensors/lists/ints, so that ``torch.load(weights_only=True)`` accepts it."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "sampler": generator.get_state() if generator is not None else None,
    }


def restore_rng(state: Mapping[str, Any], generator: torch.Generator | None) -> None:
    """Set every RNG from :func:`capture_rng`'s record (CUDA only when the device count matches)."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("sampler") is not None and generator is not None:
        generator.set_state(state["sampler"])


def gather_rng(generator: torch.Generator | None) -> Any:
    """This process's RNG record, or under DDP the list of every rank's (a collective: all ranks call it)."""
    rng = capture_rng(generator)
    if not is_distributed():
        return rng
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, rng)
    return gathered


def loader_generator(loader: Any) -> torch.Generator | None:
    """The train loader's sampler generator (re-seeded per epoch, saved for resume), or None."""
    generator = getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


# --------------------------------------------------------------------------- scheduler state without its closures


def scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """The scheduler's state without its lambdas (closures: rebuilt from the config on resume)."""
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)  # closures; rebuilt from cfg on resume
    return state


def restore_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, saved: Mapping[str, Any], path: Path) -> None:
    """Load the saved scheduler state into the rebuilt one; the lambdas stay those of the current cfg.

    The saved state (``last_epoch``, ``_step_count``, ``base_lrs``, ``_last_lr``) must sit at the
    step the rebuilt scheduler starts from; the group rates are then recomputed from the saved base
    rates and the current schedule, so that resuming with more epochs still extends the cosine.

    Raises:
        CheckpointError: the saved state is of another step or another number of param groups.
    """
    state = dict(saved)
    state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)  # closures are not stored: keep the rebuilt ones
    base_lrs = list(state.get("base_lrs", scheduler.base_lrs))
    if int(state.get("last_epoch", scheduler.last_epoch)) != scheduler.last_epoch or len(base_lrs) != len(scheduler.base_lrs):
        raise CheckpointError(
            f"last.pt's scheduler state (step {state.get('last_epoch')}, {len(base_lrs)} groups) does not match its "
            f"optimiser (step {scheduler.last_epoch}, {len(scheduler.base_lrs)} groups)",
            file=path,
            record="scheduler",
            fix="the file was edited or written by another version: run the stage without --resume",
        )
    scheduler.load_state_dict(state)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # noqa: SLF001 - what LRScheduler.step() would have set



# --------------------------------------------------------------------------- the training state


@dataclass(eq=False)
class TrainingState:
    """Model, optimiser, schedule, scaler and the loop's counters, saved and restored as one.

    Attributes:
        model: the unwrapped model (not the DDP wrapper).
        meta: plain data stored first in every checkpoint (task, model name and args, categories...).
        epoch: epochs completed; ``global_step``: optimiser steps taken.
        metrics: the last epoch's validation metrics; ``history``: one record per epoch.
        best_value, best_epoch, best_metrics: the monitored metric's best so far (see
            :class:`~components.training.callbacks.EarlyStopping`); ``bad_epochs``: epochs since.
        generator: the train loader's sampler generator, whose state goes with the RNG states.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    cfg: TrainConfig
    steps_per_epoch: int
    meta: Mapping[str, Any]
    generator: torch.Generator | None = None
    epoch: int = 0
    global_step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = 0
    best_metrics: dict[str, Any] = field(default_factory=dict)
    bad_epochs: int = 0
    stopped_early: bool = False

    def model_record(self) -> dict[str, Any]:
        """What ``best.pt`` holds: meta, weights, config, counters, metrics, best, history (no optimiser, no RNG)."""
        es = self.cfg.early_stopping
        return {
            "format": CHECKPOINT_FORMAT,
            **dict(self.meta),
            "state_dict": self.model.state_dict(),
            "train_config": self.cfg.model_dump(mode="json"),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "metrics": self.metrics,
            "best": {"monitor": es.monitor, "mode": es.mode, "value": self.best_value, "epoch": self.best_epoch, "metrics": self.best_metrics},
            "early_stopping": {"bad_epochs": self.bad_epochs},
            "stopped_early": self.stopped_early,
            "history": self.history,
        }

    def state_dict(self, rng: Any = None, record: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What ``last.pt`` holds: :meth:`model_record` + optimiser, scheduler, scaler and RNG states.

        Args:
            rng: the RNG record (:func:`gather_rng`, every rank's under DDP); this process's when None.
            record: an already built :meth:`model_record` of the same moment (saves a second copy).
        """
        return {
            **(record if record is not None else self.model_record()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler_state(self.scheduler),
            "scaler": self.scaler.state_dict(),
            "rng": rng if rng is not None else capture_rng(self.generator),
        }

    def load_state_dict(self, ckpt: Mapping[str, Any], *, file: Path) -> None:
        """Continue from ``ckpt`` (a ``last.pt``); the schedule is rebuilt for the *current* ``cfg.epochs``.

        Raises:
            CheckpointError: the file is of another task/model, or does not fit the model/optimiser.
        """
        for key in ("task", "model_name"):
            if key in self.meta and key in ckpt and ckpt[key] != self.meta[key]:
                raise CheckpointError(
                    f"last.pt is a {ckpt[key]!r} checkpoint, this run trains {self.meta[key]!r}", file=file, record=key, fix=_RESUME_FIX
                )
        try:
            self.model.load_state_dict(ckpt["state_dict"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"last.pt does not fit this model/optimiser: {str(err).splitlines()[0]}", file=file, fix=_RESUME_FIX) from None
        # The schedule is a function of the step: rebuild it at the saved step from the *current*
        # cfg.epochs (a larger count extends the cosine), on the restored groups' initial_lr,
        # then restore the rest of its state (step count, base rates) from last.pt.
        self.scheduler = build_scheduler(self.optimizer, self.cfg, steps_per_epoch=self.steps_per_epoch, start_step=int(ckpt["global_step"]))
        if ckpt.get("scheduler"):
            restore_scheduler(self.scheduler, ckpt["scheduler"], file)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        best = ckpt.get("best", {})
        self.best_value, self.best_epoch = best.get("value"), int(best.get("epoch", 0))
        self.bad_epochs = int(ckpt.get("early_stopping", {}).get("bad_epochs", 0))
        self.best_metrics = dict(best.get("metrics", {}))
        self.history = list(ckpt.get("history", []))
        self.metrics = self.history[-1].get("val", {}) if self.history else {}
        rng = ckpt["rng"]
        restore_rng(rng[rank()] if isinstance(rng, list) else rng, self.generator)
        self.stopped_early = bool(ckpt.get("stopped_early"))
