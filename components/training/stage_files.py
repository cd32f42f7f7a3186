"""What a stage keeps beside its checkpoints: its state file (outside DVC) and its out folder.

The state file ``.visionflow/stages/<stage>.json`` holds what varies from run to run (the MLflow
run id, epoch times), which must not go into the DVC-cached out folder. A stage its data cannot
feed leaves an out folder holding only ``SKIPPED.txt``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.io import atomic_write_text
from components.training.runtime import is_main_process, log_line

#: where a stage keeps what must not go into its DVC-cached out folder (MLflow run id, timings)
STAGE_STATE_DIR = Path(".visionflow") / "stages"
SKIPPED = "SKIPPED.txt"


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
        atomic_write_text(path, json.dumps(state, indent=2, default=str) + "\n")
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
