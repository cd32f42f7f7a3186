"""Checkpoint I/O: atomic, byte-stable saves; ``weights_only`` loads; a model rebuilt from its file alone.

Checkpoints are plain dicts of tensors and Python scalars that load with
``torch.load(..., weights_only=True)``. Equal checkpoints give equal bytes (DVC caches the out
folders). A writer killed mid-save leaves a ``.<name>.<pid>.tmp`` file, never a bad checkpoint;
:func:`remove_stale_temp_files` clears those of dead writers.
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from components.errors import CheckpointError, ConfigError
from components.io import atomic_write_text

CHECKPOINT_FORMAT = "visionflow-checkpoint/1"
BEST = "best.pt"
LAST = "last.pt"
DIVERGED = "diverged.json"


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



def mark_diverged(out_dir: Path, *, stage: str, epoch: int, step: int, loss: float) -> None:
    """Leave ``diverged.json`` and drop ``best.pt``: a diverged run must never feed registration."""
    (out_dir / BEST).unlink(missing_ok=True)
    atomic_write_text(out_dir / DIVERGED, json.dumps({"stage": stage, "epoch": epoch, "step": step, "loss": str(loss)}, indent=2))
