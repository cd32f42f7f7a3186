"""The one training/evaluation loop every stage uses (classification, detection, segmentation).

What the engine owns, so that no stage re-implements it:

* optimiser (SGD with momentum or AdamW, no weight decay on biases and norm weights) and a
  per-step learning-rate schedule: linear warm-up, then cosine or step decay;
* gradient clipping, CUDA mixed precision (``torch.autocast`` in bfloat16 where the GPU has it,
  else float16 with a ``GradScaler``; convnets channels-last), a NaN/inf guard that stops the
  stage with :class:`~components.errors.TrainingError`;
* seeding and a deterministic data order: the train loader's sampler generator is re-seeded from
  ``(cfg.seed, epoch)`` at the start of every epoch (as ``DistributedSampler.set_epoch`` does);
* per-epoch validation through a task's ``evaluate`` callback, early stopping on a named metric;
* ``best.pt`` and ``last.pt`` written atomically (temp file + ``os.replace``) after every epoch;
  temp files left by a writer killed mid-save are removed when the next run starts;
* exact resume: ``last.pt`` holds model, optimiser, scheduler, scaler, epoch, global step, best
  metric, early-stopping state, every RNG state (python, numpy, torch, CUDA, the sampler
  generator) and the caller's ``meta``, so an interrupted run resumed with ``resume=True`` ends
  with the same weights as a straight run; resuming with more epochs extends the schedule to the
  new length;
* checkpoints are a function of their inputs only (code, data, params): no wall-clock times, run
  ids, host names or absolute paths are written into them, so the same stage run twice writes
  byte-identical files (DVC caches the out folders). What varies from run to run (epoch times,
  the MLflow run id) goes to the stage's *state file* outside the out folders,
  ``.visionflow/stages/<stage>.json`` (:func:`stage_state_path`, :func:`update_stage_state`);
* logs a scheduler can keep: a tqdm bar per epoch on a terminal, and always one flushed line per
  epoch on stderr (epoch, loss, lr, images/s, the validation metric): :func:`progress`, :func:`log_line`;
* DDP when ``torch.distributed`` was initialised (``torchrun``): ``DistributedSampler`` through
  :func:`build_loader`, gradients averaged by ``DistributedDataParallel``, only rank 0 evaluates,
  logs and writes checkpoints, the others wait at barriers.

The parts live in :mod:`components.training` (runtime, optimiser, checkpoint I/O, stage files,
:class:`~components.training.state.TrainingState`, callbacks); this module is the loop
(:func:`fit` -> :func:`train_one_epoch`, :func:`validate`, then the callbacks) and re-exports the
public names, so stages import from ``components.engine`` alone.

The engine never imports mlflow: per-epoch metrics go to the ``log_metrics(metrics, step)``
callback the stage passes (``RunLogger.log_metrics``). Checkpoints are plain dicts of tensors and
Python scalars that load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from components.config import TrainConfig
from components.errors import TrainingError
from components.training.callbacks import Checkpointer, EarlyStopping, EpochTimes
from components.training.checkpoint import (
    BEST,
    CHECKPOINT_FORMAT,
    DIVERGED,
    LAST,
    load_checkpoint,
    load_model,
    mark_diverged,
    remove_stale_temp_files,
    save_checkpoint,
)
from components.training.optim import build_optimizer, build_scheduler, lr_factor
from components.training.runtime import (
    amp_dtype,
    barrier,
    count_parameters,
    epoch_seed,
    interactive,
    is_distributed,
    is_main_process,
    log_line,
    needs_grad_scaler,
    prefers_channels_last,
    progress,
    rank,
    resolve_device,
    seed_everything,
    synchronize,
    torch_threads,
    world_size,
)
from components.training.stage_files import (
    SKIPPED,
    STAGE_STATE_DIR,
    dataset_record,
    prepare_out_dir,
    read_skipped,
    read_stage_state,
    resumed_run_id,
    stage_state_path,
    update_stage_state,
    write_skipped,
)
from components.training.state import TrainingState, loader_generator

__all__ = [
    "BEST", "CHECKPOINT_FORMAT", "DIVERGED", "LAST", "SKIPPED", "STAGE_STATE_DIR",
    "EpochStats", "FitResult", "TrainingState",
    "barrier", "build_loader", "build_optimizer", "build_scheduler", "count_parameters", "dataset_record", "epoch_seed",
    "fit", "interactive", "is_distributed", "is_main_process", "load_checkpoint", "load_model", "log_line", "lr_factor",
    "prepare_out_dir", "progress", "rank", "read_skipped", "read_stage_state", "remove_stale_temp_files", "resolve_device",
    "resumed_run_id", "save_checkpoint", "seed_everything", "stage_state_path", "synchronize", "torch_threads",
    "train_one_epoch", "update_stage_state", "validate", "world_size", "write_skipped",
]

StepFn = Callable[[nn.Module, Any, torch.device], Mapping[str, Tensor]]
EvaluateFn = Callable[[nn.Module, Iterable[Any], torch.device], Mapping[str, Any]]
LogFn = Callable[[Mapping[str, float], int], None]


# --------------------------------------------------------------------------- loaders


def build_loader(
    dataset: Dataset,
    cfg: TrainConfig,
    *,
    train: bool,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    batch_size: int | None = None,
) -> DataLoader:
    """A DataLoader with the engine's conventions: seeded sampler generator, ``cfg.workers``, DDP sampler.

    Args:
        dataset: any map-style dataset.
        cfg: the stage's training settings (``batch_size``, ``workers``, ``seed``).
        train: shuffle (with a generator that :func:`fit` re-seeds every epoch) when True;
            sequential order for validation.
        collate_fn: e.g. ``detection_collate`` for list-of-targets batches.
        batch_size: overrides ``cfg.batch_size`` (e.g. a larger validation batch).
    """
    generator = torch.Generator()
    generator.manual_seed(epoch_seed(cfg.seed, 0))
    sampler = None
    if is_distributed() and train:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=cfg.seed, drop_last=False)
    return DataLoader(
        dataset,
        batch_size=batch_size or cfg.batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=collate_fn,
        generator=generator,
        pin_memory=torch.cuda.is_available() and cfg.device != "cpu",
        drop_last=False,
        persistent_workers=False,
    )


def _set_epoch(loader: Iterable[Any], seed: int, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        sampler.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(epoch_seed(seed, epoch))


# --------------------------------------------------------------------------- the loop


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        history: one dict per completed epoch: ``epoch``, ``global_step``, ``lr``, ``train_<name>``
            (epoch means of what ``step`` returned), ``val`` (what ``evaluate`` returned). The same
            list is stored in the checkpoints, so it holds no timings.
        metrics: the last epoch's validation metrics (the best epoch's are ``best_metrics``).
        monitor: the metric that chose ``best.pt`` (``None``: best = last epoch).
        train_time_s: wall time of training + validation over all sessions of a resumed run (the
            earlier sessions' from the ``state_file``, when :func:`fit` was given one).
        cpu_time_s: CPU time of this process over the same span (on a CPU shared with other
            jobs, with ``threads: 1``, close to what the wall time would be on an idle machine).
        epoch_time_s: wall time of each epoch in ``history`` (0.0 where an earlier session's is unknown).
    """

    best_path: Path | None
    last_path: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    best_metrics: dict[str, Any] = field(default_factory=dict)
    monitor: str | None = None
    best_value: float | None = None
    best_epoch: int = 0
    epochs_completed: int = 0
    global_step: int = 0
    stopped_early: bool = False
    train_time_s: float = 0.0
    cpu_time_s: float = 0.0
    images_per_s: float = 0.0
    epoch_time_s: list[float] = field(default_factory=list)


def _num_images(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    if isinstance(first, Tensor):
        return int(first.shape[0]) if first.ndim > 0 else 1
    if isinstance(first, (list, tuple)):
        return len(first)
    return 1


def _scalars(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Flat numeric entries (nested dicts such as per-class scores are left to the stage's JSON)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def _plain(value: Any) -> Any:
    """Metrics as JSON-able plain data (tensors to lists/floats)."""
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value



#: validation metrics the per-epoch line shows first (the first one present), after the monitored one
HEADLINE_METRICS = ("accuracy", "map_50", "miou", "macro_f1", "map", "loss")


def _epoch_line(stage: str, record: Mapping[str, Any], epochs: int, images_per_s: float, seconds: float,
                monitor: str | None, stopped_early: bool) -> str:
    """``detect yolo epoch 3/16: loss 0.4123 lr 9.51e-04 212 img/s 31.2 s val map_50 0.4410``."""
    parts = [f"{stage} epoch {record['epoch']}/{epochs}:"]
    if "train_loss" in record:
        parts.append(f"loss {record['train_loss']:.4f}")
    parts += [f"lr {record['lr']:.3g}", f"{images_per_s:.1f} img/s", f"{seconds:.1f} s"]
    val = _scalars(record.get("val") or {}, "")
    shown = [k for k in (monitor, *HEADLINE_METRICS) if k in val][:1] or list(val)[:1]
    parts += [f"val {k} {val[k]:.4f}" for k in shown]
    if stopped_early:
        parts.append("(early stop)")
    return " ".join(parts)


@dataclass
class EpochStats:
    """What one pass of :func:`train_one_epoch` measured: summed step outputs, steps, images, step seconds."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    images: int = 0
    seconds: float = 0.0

    def add(self, out: Mapping[str, Any], loss_value: float, images: int, seconds: float) -> None:
        self.steps += 1
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0.0) + (loss_value if k == "loss" else float(v.detach() if isinstance(v, Tensor) else v))
        self.images += images
        self.seconds += seconds

    def all_reduce(self, device: torch.device) -> None:
        """Under DDP: the means over every rank's shard (the global batch), not rank 0's alone."""
        if is_distributed() and self.sums:
            keys = sorted(self.sums)
            totals = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(totals)
            self.sums = dict(zip(keys, (totals / world_size()).tolist(), strict=True))

    def means(self) -> dict[str, float]:
        """``{"train_<name>": epoch mean}`` of every entry the step returned."""
        return {f"train_{k}": v / max(1, self.steps) for k, v in self.sums.items()}


def _raise_diverged(out_dir: Path, stage: str, *, epoch: int, step: int, batch_idx: int, loss: float) -> None:
    """The NaN/inf guard: mark the out folder (rank 0) and stop the stage with :class:`TrainingError`."""
    if is_main_process():
        mark_diverged(out_dir, stage=stage, epoch=epoch + 1, step=step + 1, loss=loss)
    raise TrainingError(
        f"loss is {loss} at epoch {epoch + 1}, step {step + 1} (batch {batch_idx}); training diverged",
        file=out_dir,
        record=f"{stage} epoch {epoch + 1} step {step + 1}",
        fix="lower train.lr, set train.grad_clip (e.g. 1.0) or add warm-up, and check the data for NaN; nothing from this run is kept",
    )


def _optimise(state: TrainingState, loss: Tensor) -> None:
    """Backward through the scaler, optional clipping, optimiser and scheduler step."""
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if state.cfg.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), state.cfg.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.global_step += 1


def train_one_epoch(
    model: nn.Module,
    step: StepFn,
    state: TrainingState,
    loader: Iterable[Any],
    device: torch.device,
    epoch: int,
    *,
    use_amp: bool,
    out_dir: Path,
    stage: str,
    dtype: torch.dtype = torch.float16,
) -> EpochStats:
    """One epoch (at most ``state.steps_per_epoch`` batches) of ``step`` under autocast, as torchvision's reference loop.

    Args:
        model: the model to run (the DDP wrapper under torchrun; ``state.model`` is the unwrapped one).
        epoch: 0-based; re-seeds the loader's sampler (:func:`_set_epoch`).
        use_amp, dtype: autocast on and its dtype (:func:`components.training.runtime.amp_dtype`).
        out_dir, stage: where ``diverged.json`` goes and the name in the error, should the loss be NaN/inf.

    Raises:
        TrainingError: the loss is not finite.
    """
    model.train()
    _set_epoch(loader, state.cfg.seed, epoch)
    stats = EpochStats()
    bar = progress(total=state.steps_per_epoch, desc=f"{stage} {epoch + 1}/{state.cfg.epochs}", leave=False, dynamic_ncols=True)
    for batch_idx, batch in enumerate(loader):
        if batch_idx >= state.steps_per_epoch:
            break
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
            out = step(model, batch, device)
        loss = out["loss"]
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            _raise_diverged(out_dir, stage, epoch=epoch, step=state.global_step, batch_idx=batch_idx, loss=loss_value)
        _optimise(state, loss)
        dt = time.perf_counter() - t0
        n = _num_images(batch)
        stats.add(out, loss_value, n, dt)
        bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{n / max(dt, 1e-9):.0f}", lr=f"{state.optimizer.param_groups[0]['lr']:.2e}")
        bar.update(1)
    bar.close()
    stats.all_reduce(device)
    return stats


def validate(
    model: nn.Module, raw_model: nn.Module, evaluate: EvaluateFn | None, loader: Iterable[Any] | None, device: torch.device, *, use_amp: bool,
    dtype: torch.dtype = torch.float16,
) -> dict[str, Any]:
    """The epoch's validation metrics: ``evaluate`` on rank 0 in eval mode, broadcast to the other ranks."""
    metrics: dict[str, Any] = {}
    if evaluate is not None and loader is not None and is_main_process():
        model.eval()
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
            metrics = _plain(dict(evaluate(raw_model, loader, device)))
    if is_distributed():
        box = [metrics]
        torch.distributed.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def fit(
    model: nn.Module,
    *,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None,
    step: StepFn,
    evaluate: EvaluateFn | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    meta: Mapping[str, Any],
    param_groups: list[dict[str, Any]] | None = None,
    resume: bool = False,
    log_metrics: LogFn | None = None,
    desc: str = "",
    state_file: str | Path | None = None,
) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` epochs, validating and checkpointing after each.

    Args:
        model: any ``nn.Module``; moved to ``resolve_device(cfg.device)``.
        train_loader: batches for ``step``; build it with :func:`build_loader` for the seeded,
            resumable order (any iterable works; a ``DataLoader`` with a ``generator`` is re-seeded
            per epoch).
        val_loader: batches for ``evaluate`` (None: no validation).
        step: ``step(model, batch, device) -> {"loss": Tensor[], **scalars}``; the engine runs it
            under autocast, back-propagates ``loss`` and logs the epoch means of every entry.
        evaluate: ``evaluate(model, loader, device) -> {metric: float, ...}``, called in eval mode
            under ``torch.no_grad`` on rank 0 only.
        cfg: the stage's :class:`~components.config.TrainConfig`.
        out_dir: where ``best.pt`` and ``last.pt`` go.
        meta: plain data stored in every checkpoint: ``task``, ``model_name``, ``model_args``,
            ``categories``, the dataset, ... (what :func:`load_model` needs to rebuild). Keep it a
            function of the stage's inputs: no run ids, times, host names or absolute paths.
        param_groups: see :func:`build_optimizer` (default: one group of all trainable parameters).
        resume: continue from ``out_dir/last.pt`` when it exists (a fresh start otherwise).
        log_metrics: ``log_metrics(metrics, step=epoch)`` after every epoch (MLflow's).
        desc: the stage's name, shown on the progress bar and in error messages.
        state_file: the stage's state file (:func:`stage_state_path`): the per-epoch wall and CPU
            times go there under ``"fit"`` (never into a checkpoint), and a resumed run reads the
            earlier sessions' back from it.

    Returns:
        :class:`FitResult` with the history, best/last paths and timings.

    Raises:
        TrainingError: the loss became NaN/inf (``diverged.json`` is written, ``best.pt`` removed,
            so nothing from the run can be registered).
        CheckpointError: ``resume`` found an unreadable ``last.pt`` or one of another model.
    """
    with torch_threads(cfg.threads):
        return _fit(
            model, train_loader=train_loader, val_loader=val_loader, step=step, evaluate=evaluate, cfg=cfg,
            out_dir=Path(out_dir), meta=meta, param_groups=param_groups, resume=resume, log_metrics=log_metrics, desc=desc,
            state_file=Path(state_file) if state_file is not None else None,
        )



def _steps_per_epoch(loader: Iterable[Any], cfg: TrainConfig, stage: str) -> int:
    try:
        steps = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise TrainingError("the train loader has no length", record=stage, fix="pass a DataLoader or a sized iterable") from None
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    if steps == 0:
        raise TrainingError("the train loader is empty", record=stage, fix="check the dataset split and batch size")
    return steps


def _start(state: TrainingState, out_dir: Path, *, resume: bool, state_file: Path | None) -> EpochTimes:
    """Restore ``state`` from ``last.pt`` (resume), or clear an old run's files (a fresh start); the times so far."""
    main = is_main_process()
    last_path = out_dir / LAST
    times = EpochTimes()
    if resume and last_path.exists():
        state.load_state_dict(load_checkpoint(last_path), file=last_path)  # on CPU: RNG states must stay CPU tensors
        times = EpochTimes.resumed(state_file, len(state.history))
    elif main:
        for stale in (out_dir / BEST, last_path, out_dir / DIVERGED):  # a fresh run never mixes with an old one's files
            stale.unlink(missing_ok=True)
    if main and state_file is not None:
        times.write(state_file, len(state.history))
    barrier()
    return times


@dataclass
class _Loop:
    """What every epoch of one :func:`fit` call shares."""

    model: nn.Module
    state: TrainingState
    train_loader: Iterable[Any]
    val_loader: Iterable[Any] | None
    step: StepFn
    evaluate: EvaluateFn | None
    device: torch.device
    use_amp: bool
    dtype: torch.dtype
    out_dir: Path
    stage: str
    log_metrics: LogFn | None
    early_stopping: EarlyStopping
    checkpointer: Checkpointer


def _run_epoch(loop: _Loop, epoch: int) -> EpochStats:
    """Train, validate, then call the callbacks (early stopping, checkpointing) and log the epoch."""
    state, cfg = loop.state, loop.state.cfg
    epoch_start, epoch_cpu_start = time.perf_counter(), time.process_time()
    stats = train_one_epoch(
        loop.model, loop.step, state, loop.train_loader, loop.device, epoch, use_amp=loop.use_amp, out_dir=loop.out_dir, stage=loop.stage,
        dtype=loop.dtype,
    )
    record: dict[str, Any] = {"epoch": epoch + 1, "global_step": state.global_step, "lr": state.optimizer.param_groups[0]["lr"]}
    record.update(stats.means())
    metrics = validate(loop.model, state.model, loop.evaluate, loop.val_loader, loop.device, use_amp=loop.use_amp, dtype=loop.dtype)
    record["val"] = metrics
    times = loop.checkpointer.times
    times.add(time.perf_counter() - epoch_start, time.process_time() - epoch_cpu_start)

    improved = loop.early_stopping(state, record)
    state.history.append(record)
    state.epoch, state.metrics = epoch + 1, metrics

    images_per_s = stats.images / stats.seconds if stats.seconds > 0 else 0.0
    log_line(_epoch_line(loop.stage, record, cfg.epochs, images_per_s, times.wall[-1], cfg.early_stopping.monitor, state.stopped_early))
    if loop.log_metrics is not None and is_main_process():
        logged = {k: v for k, v in _scalars(record, "").items() if k not in ("epoch", "global_step")}
        logged.update(time_s=times.wall[-1], images_per_s=images_per_s)
        loop.log_metrics({**logged, **_scalars(metrics, "val_")}, epoch + 1)
    loop.checkpointer(state, improved=improved)
    barrier()
    return stats


def _fit(
    model: nn.Module,
    *,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None,
    step: StepFn,
    evaluate: EvaluateFn | None,
    cfg: TrainConfig,
    out_dir: Path,
    meta: Mapping[str, Any],
    param_groups: list[dict[str, Any]] | None,
    resume: bool,
    log_metrics: LogFn | None,
    desc: str,
    state_file: Path | None,
) -> FitResult:
    device = resolve_device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    dtype = amp_dtype(device)  # bfloat16 where the GPU has it; float16 (with the scaler below) otherwise
    stage = desc or out_dir.name
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out_dir)  # a previous run killed mid-save left its .last.pt.<pid>.tmp
    model.to(device)
    if prefers_channels_last(model, device, amp=use_amp):
        model.to(memory_format=torch.channels_last)  # NHWC weights: cuDNN's tensor-core convolutions
    raw_model = model
    if is_distributed():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = _steps_per_epoch(train_loader, cfg, stage)
    optimizer = build_optimizer(raw_model, cfg, param_groups)
    state = TrainingState(
        model=raw_model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg, steps_per_epoch=steps_per_epoch),
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp and needs_grad_scaler(dtype)),
        cfg=cfg,
        steps_per_epoch=steps_per_epoch,
        meta=meta,
        generator=loader_generator(train_loader),
    )
    times = _start(state, out_dir, resume=resume, state_file=state_file)
    loop = _Loop(
        model, state, train_loader, val_loader, step, evaluate, device, use_amp, dtype, out_dir, stage, log_metrics,
        EarlyStopping.from_config(cfg, stage), Checkpointer(out_dir, state_file, times),
    )
    seen_images, train_seconds = 0, 0.0
    for epoch in range(cfg.epochs if state.stopped_early else state.epoch, cfg.epochs):  # an early-stopped run is complete
        stats = _run_epoch(loop, epoch)
        seen_images, train_seconds = seen_images + stats.images, train_seconds + stats.seconds
        if state.stopped_early:
            break
    return _result(state, out_dir, times, images_per_s=seen_images / train_seconds if train_seconds > 0 else 0.0)


def _result(state: TrainingState, out_dir: Path, times: EpochTimes, *, images_per_s: float) -> FitResult:
    best_path, last_path = out_dir / BEST, out_dir / LAST
    return FitResult(
        best_path=best_path if best_path.exists() else None,
        last_path=last_path if last_path.exists() else None,
        history=state.history,
        metrics=state.metrics,
        best_metrics=state.best_metrics,
        monitor=state.cfg.early_stopping.monitor,
        best_value=state.best_value,
        best_epoch=state.best_epoch,
        epochs_completed=len(state.history),
        global_step=state.global_step,
        stopped_early=state.stopped_early,
        train_time_s=sum(times.wall),
        cpu_time_s=sum(times.cpu),
        images_per_s=images_per_s,
        epoch_time_s=list(times.wall),
    )
