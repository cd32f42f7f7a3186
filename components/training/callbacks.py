"""What the loop calls after each epoch: early stopping (which also tracks the best epoch) and checkpointing.

Each is a small object called as ``callback(state, ...)`` with the
:class:`~components.training.state.TrainingState` after the epoch's validation, in this order:
:class:`EarlyStopping` (best value, best epoch, bad-epoch counter, stop flag), then
:class:`Checkpointer` (``best.pt`` when the epoch improved, ``last.pt`` always, the epoch times
to the stage's state file).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.config import TrainConfig
from components.errors import ConfigError
from components.training.checkpoint import BEST, LAST, save_checkpoint
from components.training.runtime import is_main_process
from components.training.stage_files import read_stage_state, update_stage_state
from components.training.state import TrainingState, gather_rng


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if mode == "max" else value < best


def _monitored(monitor: str, metrics: Mapping[str, Any], record: Mapping[str, Any], stage: str) -> float:
    """The early-stopping metric: a validation metric by name, or a ``train_*`` entry of the epoch."""
    if monitor in metrics and isinstance(metrics[monitor], (int, float)):
        return float(metrics[monitor])
    if monitor in record and isinstance(record[monitor], (int, float)):
        return float(record[monitor])
    options = sorted([k for k, v in metrics.items() if isinstance(v, (int, float))] + [k for k in record if k.startswith("train_")])
    raise ConfigError(
        f"early_stopping.monitor {monitor!r} is not among the epoch's metrics",
        record=f"{stage}.train.early_stopping.monitor",
        fix=f"use one of {options}",
    )


@dataclass
class EarlyStopping:
    """Track the best epoch on ``monitor`` and stop after ``patience`` epochs without improvement.

    Without a monitor every epoch is the best (``best.pt`` = the last epoch) and training never stops early.
    """

    monitor: str | None
    mode: str
    patience: int
    epochs: int
    stage: str

    @classmethod
    def from_config(cls, cfg: TrainConfig, stage: str) -> EarlyStopping:
        es = cfg.early_stopping
        return cls(monitor=es.monitor, mode=es.mode, patience=es.patience, epochs=cfg.epochs, stage=stage)

    def __call__(self, state: TrainingState, record: Mapping[str, Any]) -> bool:
        """Update ``state``'s best and counter from the epoch's ``record``; True when the epoch is the best so far.

        Raises:
            ConfigError: ``monitor`` is neither a validation metric nor a ``train_*`` entry.
        """
        epoch, metrics = int(record["epoch"]), record["val"]
        improved = True
        if self.monitor is not None:
            value = _monitored(self.monitor, metrics, record, self.stage)
            improved = _is_better(value, state.best_value, self.mode)
            if improved:
                state.best_value, state.best_epoch, state.bad_epochs = value, epoch, 0
            else:
                state.bad_epochs += 1
            state.stopped_early = state.bad_epochs >= self.patience and epoch < self.epochs
        else:
            state.best_epoch = epoch
        if improved:
            state.best_metrics = metrics
        return improved


@dataclass
class EpochTimes:
    """Wall and CPU seconds per epoch: kept in the stage's state file, never in a checkpoint."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @classmethod
    def resumed(cls, state_file: Path | None, done: int) -> EpochTimes:
        """The first ``done`` epochs' times an earlier session recorded (0.0 where none was)."""
        timings = read_stage_state(state_file).get("fit", {}) if state_file is not None else {}
        wall = [float(t) for t in timings.get("epoch_time_s", [])][:done]
        cpu = [float(t) for t in timings.get("epoch_cpu_s", [])][:done]
        return cls(wall + [0.0] * (done - len(wall)), cpu + [0.0] * (done - len(cpu)))

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    def write(self, state_file: Path, epoch: int) -> None:
        update_stage_state(state_file, fit={"epoch": epoch, "epoch_time_s": self.wall, "epoch_cpu_s": self.cpu})


@dataclass
class Checkpointer:
    """After each epoch: ``best.pt`` when it improved, ``last.pt`` always (rank 0), the times to the state file.

    Every rank must call it: under DDP the RNG states of all ranks are gathered into ``last.pt``.
    """

    out_dir: Path
    state_file: Path | None
    times: EpochTimes

    def __call__(self, state: TrainingState, *, improved: bool) -> None:
        main = is_main_process()
        record = state.model_record() if main else None
        if main and improved:
            save_checkpoint(self.out_dir / BEST, record)
        rng = gather_rng(state.generator)
        if main:
            save_checkpoint(self.out_dir / LAST, state.state_dict(rng, record))
            if self.state_file is not None:
                self.times.write(self.state_file, state.epoch)
