"""The one training/evaluation loop every stage uses (classification, detection, segmentation).

What the engine owns, so that no stage re-implements it:

* optimiser (SGD with momentum or AdamW, no weight decay on biases and norm weights) and a
  per-step learning-rate schedule: linear warm-up, then cosine or step decay;
* gradient clipping, CUDA mixed precision (``torch.autocast`` + ``GradScaler``), a NaN/inf guard
  that stops the stage with :class:`~components.errors.TrainingError`;
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

The engine never imports mlflow: per-epoch metrics go to the ``log_metrics(metrics, step)``
callback the stage passes (``RunLogger.log_metrics``). Checkpoints are plain dicts of tensors and
Python scalars that load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from components.config import TrainConfig
from components.errors import CheckpointError, ConfigError, TrainingError

CHECKPOINT_FORMAT = "visionflow-checkpoint/1"
BEST = "best.pt"
LAST = "last.pt"
DIVERGED = "diverged.json"
#: where a stage keeps what must not go into its DVC-cached out folder (MLflow run id, timings)
STAGE_STATE_DIR = Path(".visionflow") / "stages"

StepFn = Callable[[nn.Module, Any, torch.device], Mapping[str, Tensor]]
EvaluateFn = Callable[[nn.Module, Iterable[Any], torch.device], Mapping[str, Any]]
LogFn = Callable[[Mapping[str, float], int], None]


# --------------------------------------------------------------------------- device, seeds, distributed


def is_distributed() -> bool:
    """True inside a ``torchrun`` process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Only rank 0 evaluates, logs and writes files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when present (``cuda:$LOCAL_RANK`` under torchrun), else CPU.

    Raises:
        ConfigError: ``"cuda"`` was asked for on a machine without CUDA.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}", record="train.device", fix="use auto, cpu or cuda")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is visible", record="train.device", fix="set train.device: auto or cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all CUDA devices) and make cuDNN pick deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def epoch_seed(seed: int, epoch: int) -> int:
    """The sampler seed of ``epoch``: data order is a function of (seed, epoch) alone, hence resumable."""
    return (seed * 1_000_003 + epoch) % 2**63


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


# --------------------------------------------------------------------------- threads, progress, stage state


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: leave torch's setting), then restore it.

    Every training stage wraps its whole body (data preparation, training, test evaluation) in
    this, with its ``train.threads``, so that test-time ``ms_per_image`` is measured with the
    threads training used.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def interactive() -> bool:
    """True when stderr is a terminal: progress bars then; plain lines otherwise (cron, Prefect, pipes)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)`` on a terminal, a disabled (silent, pass-through) bar otherwise.

    A loop run under a scheduler reports with :func:`log_line` instead: one line per epoch or per
    pass over a split, not tqdm's carriage-return stream.
    """
    from tqdm.auto import tqdm

    if not interactive() or not is_main_process():
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


def log_line(message: str) -> None:
    """One progress line on stderr, flushed at once (rank 0 only); stdout is left to the CLI's result."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def stage_state_path(stage: str) -> Path:
    """``.visionflow/stages/<stage>.json`` (relative to the working folder, as ``metrics/`` is).

    Args:
        stage: the stage's name as the pipeline knows it: ``pretrain``, ``finetune``,
            ``finetune@<strategy>``, ``detect@<arch>``, ``segment@<arch>``.
    """
    return STAGE_STATE_DIR / f"{stage}.json"


def read_stage_state(path: str | Path) -> dict[str, Any]:
    """The stage's state file as a dict (empty when missing or unreadable: it is a cache, not a record)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_stage_state(path: str | Path, *, replace: bool = False, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the state file (a fresh file with ``replace=True``), atomically; rank 0 only.

    Returns:
        The file's new content.
    """
    path = Path(path)
    state = {} if replace else read_stage_state(path)
    state.update(fields)
    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    return state


def resumed_run_id(
    state_file: str | Path, *, out: str | Path, resume: bool, key: str = "mlflow_run_id", exists: Callable[[str], bool] | None = None
) -> str | None:
    """The MLflow run a ``--resume`` continues: the id the state file recorded for the same out folder.

    Args:
        state_file: the stage's state file (:func:`stage_state_path`).
        out: the stage's out folder; a state file written for another folder is ignored.
        resume: False (a fresh start): always None.
        key: the entry holding the id.
        exists: ``exists(run_id)``: False makes a run that was deleted (or lives in another
            tracking store) start afresh instead of failing.

    Returns:
        The run id, or None for a new run.
    """
    if not resume:
        return None
    state = read_stage_state(state_file)
    run_id = state.get(key)
    if not isinstance(run_id, str) or not run_id or state.get("out") != str(out):
        return None
    if exists is not None and not exists(run_id):
        log_line(f"{Path(state_file).stem}: MLflow run {run_id} of {state_file} not found; resuming into a new run")
        return None
    return run_id


def dataset_record(path: str | Path) -> dict[str, str]:
    """What a checkpoint records of the dataset it was trained on: ``{"path": as given, "md5": DVC hash}``.

    The md5 is DVC's directory hash (``<md5>.dir``, as ``dvc.lock`` records the folder), so a
    consumer (the register stage) can refuse a checkpoint trained on other data than it is given.
    """
    from components.data.versioning import dvc_directory_md5

    return {"path": str(path), "md5": dvc_directory_md5(Path(path))}


SKIPPED = "SKIPPED.txt"


def write_skipped(out_dir: str | Path, reason: str) -> Path:
    """Empty ``out_dir`` and leave only ``SKIPPED.txt`` holding ``reason``: a stage its data cannot feed.

    DVC needs the stage's declared out folder; its content is a function of the reason alone
    (deterministic), and whatever an earlier run on other data left there is removed.

    Returns:
        The ``SKIPPED.txt`` path.
    """
    import shutil

    out_dir = Path(out_dir)
    if is_main_process():
        if out_dir.is_dir():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / SKIPPED).write_text(f"skipped: {reason}\n")
    return out_dir / SKIPPED


def prepare_out_dir(out_dir: str | Path, *, resume: bool) -> Path:
    """Make ``out_dir`` ready for a stage run: a fresh run (``resume=False``) starts from an empty folder.

    The folder is DVC's output: after a fresh run it must hold exactly what this run wrote, not
    files an earlier run (other code, other data, a ``SKIPPED.txt``) left there. A resumed run keeps
    the folder (its ``last.pt``) and only drops a ``SKIPPED.txt``. As a guard against a mistyped
    params path, a folder that is not strictly inside the working folder is never emptied, only
    its ``SKIPPED.txt`` removed.
    """
    import shutil

    out_dir = Path(out_dir)
    if not is_main_process():
        return out_dir
    cwd = Path.cwd().resolve()
    inside = out_dir.resolve() != cwd and cwd in out_dir.resolve().parents
    if not resume and inside and out_dir.is_dir():
        shutil.rmtree(out_dir)
    (out_dir / SKIPPED).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def read_skipped(out_dir: str | Path) -> str | None:
    """The reason in ``out_dir/SKIPPED.txt``, or None when the stage ran (or never ran)."""
    path = Path(out_dir) / SKIPPED
    if not path.is_file():
        return None
    text = path.read_text().strip()
    return text.removeprefix("skipped:").strip() or "skipped"



# --------------------------------------------------------------------------- RNG state as weights_only-safe data


def _capture_rng(loader: Iterable[Any]) -> dict[str, Any]:
    """Every RNG state as tensors/lists/ints, so that ``torch.load(weights_only=True)`` accepts it."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    generator = getattr(loader, "generator", None)
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "sampler": generator.get_state() if isinstance(generator, torch.Generator) else None,
    }


def _restore_rng(state: Mapping[str, Any], loader: Iterable[Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(loader, "generator", None)
    if state.get("sampler") is not None and isinstance(generator, torch.Generator):
        generator.set_state(state["sampler"])


# --------------------------------------------------------------------------- checkpoints


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything ``weights_only=True`` would refuse to load later (fail at save time, not at resume)."""
    if value is None or isinstance(value, (bool, int, float, str, Tensor, torch.Size)):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint key {where}.{k!r} is a {type(k).__name__}, not str/int")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint value {where} is a {type(value).__name__}; store plain data (dicts, lists, numbers, str, tensors)")


def _canonical(value: Any) -> Any:
    """Fresh containers and interned strings: the pickle's bytes then depend on the values alone.

    ``pickle`` writes an object seen before as a back-reference, so two equal checkpoints whose
    objects are shared differently (a dict referenced twice in one run, loaded as two copies by a
    resumed run; a string literal vs the same text read from a file) would differ in bytes.
    """
    if isinstance(value, str):
        return sys.intern(str(value))
    if isinstance(value, OrderedDict):  # a state_dict: keep its type and the modules' versions (``_metadata``)
        out = OrderedDict((_canonical(k), _canonical(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = _canonical(value._metadata)  # type: ignore[attr-defined]  # noqa: SLF001
        return out
    if isinstance(value, Mapping):
        return {_canonical(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        return tuple(_canonical(v) for v in value)
    return value


def save_checkpoint(path: str | Path, checkpoint: Mapping[str, Any]) -> Path:
    """Write ``checkpoint`` atomically: a temp file in the same folder, fsync, then ``os.replace``.

    A reader (or a run killed mid-write) never sees a half-written file: the old one stays until
    the new one is complete. Equal checkpoints give equal bytes (:func:`_canonical`): DVC caches
    the out folders, and a stage run twice on the same inputs must write the same files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_plain(dict(checkpoint), "checkpoint")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(_canonical(dict(checkpoint)), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _temp_owner(path: Path) -> int | None:
    """The pid in a :func:`save_checkpoint` temp file name (``.<name>.<pid>.tmp``), or None for other files."""
    parts = path.name.split(".")
    if len(parts) < 4 or parts[0] != "" or parts[-1] != "tmp" or not parts[-2].isdigit():
        return None
    return int(parts[-2])


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the half-written checkpoint temp files of writers that are dead (killed mid-save).

    :func:`save_checkpoint` writes ``.<name>.<pid>.tmp`` and renames it; a writer killed before
    the rename (SIGKILL, OOM, power loss) leaves the temp file behind, never a bad ``last.pt``.
    Files of a live process (another run still saving into this folder) are kept; a pid that was
    recycled by an unrelated live process keeps its file too, the safe side. Called by :func:`fit`
    on rank 0 when a run starts or resumes.

    Returns:
        The files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.glob(".*.tmp"):
        pid = _temp_owner(path)
        if pid is None or pid == os.getpid() or _process_alive(pid):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (untrusted files cannot run code).

    Raises:
        CheckpointError: missing, truncated/corrupt, or not a visionflow checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found", file=path, fix="run the stage that writes it, or fix the path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt files; re-raised naming the file
        raise CheckpointError(
            f"cannot read checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
            file=path,
            fix="the file is corrupt or not a torch checkpoint: delete it and re-run the stage that wrote it",
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError("not a visionflow checkpoint (no state_dict)", file=path, fix="point at a best.pt/last.pt written by visionflow")
    return ckpt


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from its checkpoint alone: ``get_model(task, model_name, **model_args)`` + state_dict.

    Returns:
        ``(model in eval mode, checkpoint dict)``; the checkpoint carries ``categories``, metrics, config.

    Raises:
        CheckpointError: unreadable file, unknown model, or weights that do not fit the architecture.
    """
    from components.models.registry import get_model

    ckpt = load_checkpoint(path, map_location=map_location)
    missing = [k for k in ("task", "model_name", "model_args") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint lacks {missing}: it cannot rebuild its model", file=path, fix="re-run the stage with this version of visionflow")
    try:
        model = get_model(ckpt["task"], ckpt["model_name"], **dict(ckpt["model_args"]))
    except ConfigError as err:
        raise CheckpointError(f"checkpoint names a model this install lacks: {err.message}", file=path, record=ckpt["model_name"], fix=err.fix) from None
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"weights do not fit {ckpt['task']}/{ckpt['model_name']}: {str(err).splitlines()[0]}",
            file=path,
            record=ckpt["model_name"],
            fix="the checkpoint was written for another architecture or model_args",
        ) from None
    model.eval()
    return model, ckpt


# --------------------------------------------------------------------------- optimiser and schedule


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


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if mode == "max" else value < best


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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
    main = is_main_process()
    device = resolve_device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    stage = desc or out_dir.name
    last_path, best_path, diverged_path = out_dir / LAST, out_dir / BEST, out_dir / DIVERGED
    monitor, mode = cfg.early_stopping.monitor, cfg.early_stopping.mode

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out_dir)  # a previous run killed mid-save left its .last.pt.<pid>.tmp
    model.to(device)
    raw_model = model
    if is_distributed():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        raise TrainingError("the train loader has no length", record=stage, fix="pass a DataLoader or a sized iterable") from None
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise TrainingError("the train loader is empty", record=stage, fix="check the dataset split and batch size")

    optimizer = build_optimizer(raw_model, cfg, param_groups)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, global_step, best_value, best_epoch, bad_epochs = 0, 0, None, 0, 0
    stopped_early = False
    history: list[dict[str, Any]] = []
    best_metrics: dict[str, Any] = {}
    epoch_wall: list[float] = []
    epoch_cpu: list[float] = []
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)  # on CPU: RNG states must stay CPU tensors
        for key in ("task", "model_name"):
            if key in meta and key in ckpt and ckpt[key] != meta[key]:
                raise CheckpointError(
                    f"last.pt is a {ckpt[key]!r} checkpoint, this run trains {meta[key]!r}",
                    file=last_path,
                    record=key,
                    fix="resume with the params that wrote it, or run without --resume",
                )
        try:
            raw_model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"last.pt does not fit this model/optimiser: {str(err).splitlines()[0]}",
                file=last_path,
                fix="resume with the params that wrote it, or run without --resume",
            ) from None
        # The schedule is a function of the step: rebuild it at the saved step from the *current*
        # cfg.epochs (a larger count extends the cosine), on the restored groups' initial_lr,
        # then restore the rest of its state (step count, base rates) from last.pt.
        scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=steps_per_epoch, start_step=int(ckpt["global_step"]))
        if ckpt.get("scheduler"):
            _restore_scheduler(scheduler, ckpt["scheduler"], last_path)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        best = ckpt.get("best", {})
        best_value, best_epoch, bad_epochs = best.get("value"), int(best.get("epoch", 0)), int(ckpt.get("early_stopping", {}).get("bad_epochs", 0))
        best_metrics = dict(best.get("metrics", {}))
        history = list(ckpt.get("history", []))
        timings = read_stage_state(state_file).get("fit", {}) if state_file is not None else {}
        done = len(history)
        epoch_wall = [float(t) for t in timings.get("epoch_time_s", [])][:done]
        epoch_cpu = [float(t) for t in timings.get("epoch_cpu_s", [])][:done]
        epoch_wall += [0.0] * (done - len(epoch_wall))  # an earlier session's times not recorded
        epoch_cpu += [0.0] * (done - len(epoch_cpu))
        rng = ckpt["rng"]
        _restore_rng(rng[rank()] if isinstance(rng, list) else rng, train_loader)
        stopped_early = bool(ckpt.get("stopped_early"))
        if stopped_early:
            start_epoch = cfg.epochs  # an early-stopped run is complete
    elif main:
        for stale in (best_path, last_path, diverged_path):  # a fresh run never mixes with an old one's files
            stale.unlink(missing_ok=True)
    if main and state_file is not None:
        update_stage_state(state_file, fit={"epoch": len(history), "epoch_time_s": epoch_wall, "epoch_cpu_s": epoch_cpu})
    barrier()

    seen_images, train_seconds = 0, 0.0
    metrics: dict[str, Any] = history[-1].get("val", {}) if history else {}
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start, epoch_cpu_start = time.perf_counter(), time.process_time()
        epoch_images, epoch_seconds = 0, 0.0
        model.train()
        _set_epoch(train_loader, cfg.seed, epoch)
        sums: dict[str, float] = {}
        n_steps = 0
        bar = progress(total=steps_per_epoch, desc=f"{stage} {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        for batch_idx, batch in enumerate(train_loader):
            if batch_idx >= steps_per_epoch:
                break
            t0 = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                out = step(model, batch, device)
            loss = out["loss"]
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                _mark_diverged(diverged_path, best_path, stage=stage, epoch=epoch + 1, step=global_step + 1, loss=loss_value, main=main)
                raise TrainingError(
                    f"loss is {loss_value} at epoch {epoch + 1}, step {global_step + 1} (batch {batch_idx}); training diverged",
                    file=out_dir,
                    record=f"{stage} epoch {epoch + 1} step {global_step + 1}",
                    fix="lower train.lr, set train.grad_clip (e.g. 1.0) or add warm-up, and check the data for NaN; nothing from this run is kept",
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            global_step += 1
            n_steps += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + (loss_value if k == "loss" else float(v.detach() if isinstance(v, Tensor) else v))
            dt = time.perf_counter() - t0
            n = _num_images(batch)
            seen_images += n
            train_seconds += dt
            epoch_images += n
            epoch_seconds += dt
            bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{n / max(dt, 1e-9):.0f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            bar.update(1)
        bar.close()
        if is_distributed() and sums:  # the epoch means of the global batch, not of rank 0's shard alone
            keys = sorted(sums)
            totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(totals)
            sums = dict(zip(keys, (totals / world_size()).tolist(), strict=True))

        record: dict[str, Any] = {"epoch": epoch + 1, "global_step": global_step, "lr": optimizer.param_groups[0]["lr"]}
        record.update({f"train_{k}": v / max(1, n_steps) for k, v in sums.items()})
        metrics = {}
        if evaluate is not None and val_loader is not None and main:
            model.eval()
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                metrics = _plain(dict(evaluate(raw_model, val_loader, device)))
        if is_distributed():
            box = [metrics]
            torch.distributed.broadcast_object_list(box, src=0)
            metrics = box[0]
        record["val"] = metrics
        epoch_wall.append(time.perf_counter() - epoch_start)
        epoch_cpu.append(time.process_time() - epoch_cpu_start)

        improved = True
        if monitor is not None:
            value = _monitored(monitor, metrics, record, stage)
            improved = _is_better(value, best_value, mode)
            if improved:
                best_value, best_epoch, bad_epochs = value, epoch + 1, 0
            else:
                bad_epochs += 1
            stopped_early = bad_epochs >= cfg.early_stopping.patience and epoch + 1 < cfg.epochs
        else:
            best_epoch = epoch + 1
        if improved:
            best_metrics = metrics
        history.append(record)

        images_per_s = epoch_images / epoch_seconds if epoch_seconds > 0 else 0.0
        log_line(_epoch_line(stage, record, cfg.epochs, images_per_s, epoch_wall[-1], monitor, stopped_early))
        if log_metrics is not None and main:
            logged = {k: v for k, v in _scalars(record, "").items() if k not in ("epoch", "global_step")}
            logged.update(time_s=epoch_wall[-1], images_per_s=images_per_s)
            log_metrics({**logged, **_scalars(metrics, "val_")}, epoch + 1)
        if main:
            state = {
                "format": CHECKPOINT_FORMAT,
                **dict(meta),
                "state_dict": raw_model.state_dict(),
                "train_config": cfg.model_dump(mode="json"),
                "epoch": epoch + 1,
                "global_step": global_step,
                "metrics": metrics,
                "best": {"monitor": monitor, "mode": mode, "value": best_value, "epoch": best_epoch, "metrics": best_metrics},
                "early_stopping": {"bad_epochs": bad_epochs},
                "stopped_early": stopped_early,
                "history": history,
            }
            if improved:
                save_checkpoint(best_path, state)
            rng = _capture_rng(train_loader)
        if is_distributed():
            gathered: list[Any] = [None] * world_size()
            torch.distributed.all_gather_object(gathered, _capture_rng(train_loader))
            rng = gathered
        if main:
            save_checkpoint(
                last_path,
                {**state, "optimizer": optimizer.state_dict(), "scheduler": _scheduler_state(scheduler), "scaler": scaler.state_dict(), "rng": rng},
            )
            if state_file is not None:
                update_stage_state(state_file, fit={"epoch": epoch + 1, "epoch_time_s": epoch_wall, "epoch_cpu_s": epoch_cpu})
        barrier()
        if stopped_early:
            break

    return FitResult(
        best_path=best_path if best_path.exists() else None,
        last_path=last_path if last_path.exists() else None,
        history=history,
        metrics=metrics,
        best_metrics=best_metrics,
        monitor=monitor,
        best_value=best_value,
        best_epoch=best_epoch,
        epochs_completed=len(history),
        global_step=global_step,
        stopped_early=stopped_early,
        train_time_s=sum(epoch_wall),
        cpu_time_s=sum(epoch_cpu),
        images_per_s=seen_images / train_seconds if train_seconds > 0 else 0.0,
        epoch_time_s=list(epoch_wall),
    )


def _scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)  # closures; rebuilt from cfg on resume
    return state


def _restore_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, saved: Mapping[str, Any], path: Path) -> None:
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


def _mark_diverged(path: Path, best_path: Path, *, stage: str, epoch: int, step: int, loss: float, main: bool) -> None:
    """Leave a marker and drop ``best.pt``: a diverged run must never feed registration."""
    if not main:
        return
    best_path.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"stage": stage, "epoch": epoch, "step": step, "loss": str(loss)}, indent=2))
    os.replace(tmp, path)
