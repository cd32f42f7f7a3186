"""The skeleton every training stage (pretrain, finetune, detect, segment) shares.

A training stage: resumes the MLflow run its state file recorded (``--resume``), starts the run,
records it in the state file, logs its params, the params hash of its own section and its dataset
as an MLflow dataset input (:func:`training_run`); trains with :func:`components.engine.fit`;
lets ranks 1.. of a torchrun job stop there (:func:`worker_result`); reloads the best checkpoint
for the test split (:func:`reload_best`); writes the metric keys every stage shares
(:func:`fit_summary`). A dataset the stage cannot use skips it (:func:`skip_stage`). Each stage's
module says only what is particular to it: data, model, step, evaluation, outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from components.config import TrackingConfig
from components.engine import (
    FitResult,
    count_parameters,
    is_main_process,
    load_model,
    log_line,
    prepare_out_dir,
    rank,
    resolve_device,
    resumed_run_id,
    stage_state_path,
    update_stage_state,
    write_skipped,
)
from components.io import write_json

if TYPE_CHECKING:
    from components.tracking import RunContext


def run_exists(tracking: TrackingConfig) -> Callable[[str], bool]:
    """``exists(run_id)`` for :func:`components.engine.resumed_run_id`: is the run in ``tracking``'s store?"""
    from components.tracking import run_status

    return lambda run_id: run_status(tracking, run_id) is not None


@dataclass
class TrainingRun:
    """An open training run: its MLflow logger, state file, out folder; ``resumed`` when it continues one."""

    stage: str
    out_dir: Path
    state_file: Path
    logger: Any
    resumed: bool

    @property
    def run_id(self) -> str:
        return str(self.logger.run_id)


@contextmanager
def training_run(
    tracking: TrackingConfig,
    *,
    stage: str,
    out_dir: Path,
    run_name: str,
    tags: Mapping[str, Any],
    resume: bool,
    params: Mapping[str, Any] | None = None,
    section: Any = None,
    dataset: str | Path | None = None,
    prepare: bool = True,
    nested: bool = False,
    state: Mapping[str, Any] | None = None,
    context: RunContext | None = None,
) -> Iterator[TrainingRun]:
    """Open (or, with ``resume``, re-open) the stage's MLflow run and keep its state file.

    Args:
        stage: the state file's name (``detect@yolo``, ``finetune@scratch``, ...).
        out_dir: the stage's out folder; emptied first unless ``resume`` (or ``prepare=False``).
        params: logged on a new run (None: the stage logs its own, e.g. once the model is built).
        section, dataset: the params section whose hash the run is tagged with (the one register
            compares) and the dataset folder logged as the run's MLflow dataset input.
        nested: a child of the active run; ``state``: extra entries of the state file.
        context: the Prefect flow run and the pipeline's MLflow parent run that started the stage.

    The state file says ``finished`` when the block ends without raising (a failed run's says ``running``).
    """
    from components.tracking import start_run

    state_file = stage_state_path(stage)
    run_id = resumed_run_id(state_file, out=out_dir, resume=resume, exists=run_exists(tracking))
    if prepare:
        prepare_out_dir(out_dir, resume=resume)
    with start_run(tracking, run_name=run_name, tags=dict(tags), run_id=run_id, nested=nested, context=context) as logger:
        update_stage_state(
            state_file, replace=run_id is None, stage=stage, out=str(out_dir), mlflow_run_id=logger.run_id, **dict(state or {}), status="running"
        )
        if run_id is None:
            if params is not None:
                logger.log_params(params)
            if section is not None or dataset is not None:
                logger.log_provenance(section=section, dataset=dataset)
        yield TrainingRun(stage=stage, out_dir=out_dir, state_file=state_file, logger=logger, resumed=run_id is not None)
        update_stage_state(state_file, status="finished")


def worker_result() -> dict[str, Any] | None:
    """``{"rank", "role": "worker"}`` on ranks 1.. of a torchrun job (they trained their shard; rank 0 alone
    tests and writes files), None on rank 0."""
    return None if is_main_process() else {"rank": rank(), "role": "worker"}


def reload_best(result: FitResult, device: str) -> tuple[nn.Module, Path, torch.device]:
    """The best checkpoint (the last one without a monitor's best) rebuilt alone, on ``resolve_device(device)``."""
    best_path = result.best_path or result.last_path
    assert best_path is not None
    model, _ = load_model(best_path)
    target = resolve_device(device)
    model.to(target)
    return model, best_path, target


def fit_summary(result: FitResult, model: nn.Module, *, device: torch.device, eval_batch: int, checkpoint: Path, run_id: str) -> dict[str, Any]:
    """The metric keys every detect/segment metrics file ends with (best validation, size, times, where it ran)."""
    return {
        "val": result.best_metrics,
        "parameters": count_parameters(model),
        "train_time_s": result.train_time_s,
        "train_cpu_time_s": result.cpu_time_s,
        "epoch_time_s": result.epoch_time_s,
        "epochs": result.epochs_completed,
        "best_epoch": result.best_epoch,
        "images_per_s": result.images_per_s,
        "device": device.type,
        "eval_batch_size": eval_batch,
        "threads": torch.get_num_threads(),
        "checkpoint": str(checkpoint),
        "run_id": run_id,
    }


def skip_stage(stage: str, arch: str, out_dir: Path, metrics_file: Path, reason: str) -> dict[str, Any]:
    """Record a stage its data cannot feed: ``metrics_file``, ``out_dir/SKIPPED.txt``, the state file; exit 0.

    Returns:
        ``{"arch": arch, "status": "skipped", "reason": reason}`` (what ``metrics_file`` holds).
    """
    metrics = {"arch": arch, "status": "skipped", "reason": reason}
    write_skipped(out_dir, reason)
    write_json(metrics, metrics_file)
    update_stage_state(stage_state_path(stage), replace=True, stage=stage, out=str(out_dir), status="skipped", reason=reason)
    log_line(f"{stage}: skipped, {reason}")
    return metrics
