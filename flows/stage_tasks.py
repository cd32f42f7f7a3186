"""How a pipeline stage becomes a Prefect task: retries for transient errors only, DVC-keyed caching.

* **Retries** (``orchestration.retries``) apply to transient failures: I/O and network errors, an
  unreachable tracking server (:class:`TrackingError`). Deterministic failures (bad params, bad
  data, a diverged loss, an unusable checkpoint: every other :class:`VisionflowError`) fail at once,
  as a retry would fail the same way.
* **Cache keys** come from the content hashes DVC uses: :class:`DvcStageInputs` resolves the stage
  in ``dvc.yaml`` (``foreach`` included), hashes each of its ``deps`` with DVC's own hashing
  (``md5``, ``.dir`` for folders, DVC's state cache makes unchanged files free) and reads the values
  of its ``params`` keys from the *effective* params (``--set`` overrides included). A re-run after a
  params change recomputes exactly the stages whose keys changed and what depends on their outputs,
  the same set ``dvc status`` reports. Prefect's default policy (task source + inputs, within one flow
  run) is replaced on purpose; results are persisted as JSON under ``orchestration.results`` so that
  keys hit across runs and processes. A stage whose outputs are missing is recomputed
  (``refresh_cache``) even when its key hits.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import CachePolicy
from prefect.filesystems import LocalFileSystem

from components.config import OrchestrationConfig, Params
from components.errors import ConfigError, TrackingError, VisionflowError


def project_root() -> Path:
    """The DVC project the pipeline runs in: the working directory (commands run from the repository root)."""
    return Path.cwd()

#: perf_counter intervals of every stage body run in this process, by stage name (read by flows/retrain.py)
STAGE_SPANS: dict[str, list[tuple[float, float]]] = {}
# DVC's state database (sqlite) and its Repo object are not meant for concurrent use from threads
_DVC_LOCK = threading.Lock()
# deterministic OSErrors: retrying cannot make a missing file appear
_PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry may cure: I/O, network, timeouts, an unreachable tracking server."""
    if isinstance(exc, TrackingError):
        return True
    if isinstance(exc, VisionflowError):  # ConfigError, DataError, TrainingError, CheckpointError, EvaluationError
        return False
    if isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    return isinstance(exc, (OSError, ConnectionError, TimeoutError))


def retry_transient(task: Task, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: continue to the retry policy only for transient exceptions."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as err:  # noqa: BLE001 - result retrieval can itself fail; treat that exception as the cause
            exc = err
    return isinstance(exc, BaseException) and is_transient(exc)


# --------------------------------------------------------------------------- DVC-derived cache keys


def _value_at(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"dvc.yaml names param {key!r}, which params.yaml lacks", file="dvc.yaml", record=key, fix="fix the stage's params list")
        node = node[part]
    return node


def _stage(repo: Any, name: str) -> Any:
    try:
        (stage,) = repo.stage.collect(name)
    except Exception as err:  # noqa: BLE001 - DVC raises several types for unknown or malformed stages
        raise ConfigError(f"no stage {name!r} in dvc.yaml ({err})", file=project_root() / "dvc.yaml", record=name, fix="run from the repository root; check the stage name") from None
    return stage


def stage_fingerprint(stage_name: str, params: Params, *, root: Path | None = None) -> dict[str, Any]:
    """What DVC would compare for ``stage_name``: its cmd, each dep's hash and each param's value.

    Args:
        stage_name: a ``dvc.yaml`` stage (``detect@yolo`` for a ``foreach`` item).
        params: the effective params (their values replace params.yaml's, so ``--set`` counts).

    Returns:
        ``{"cmd": ..., "deps": {path: hash or None}, "params": {key: value}, "outs_present": bool}``.
    """
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    tree = params.model_dump(mode="json")
    with _DVC_LOCK, Repo(str(root or project_root())) as repo:
        stage = _stage(repo, stage_name)
        deps: dict[str, str | None] = {}
        values: dict[str, Any] = {}
        for dep in stage.deps:
            if isinstance(dep, ParamsDependency):
                for key in dep.params:
                    values[key] = _value_at(tree, key)
            else:
                deps[dep.def_path] = dep.get_hash().value if dep.exists else None
        outs_present = all(out.exists for out in stage.outs)
        cmd = stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)
    return {"cmd": cmd, "deps": deps, "params": values, "outs_present": outs_present}


def fingerprint_key(fingerprint: dict[str, Any]) -> str:
    """sha256 of the fingerprint's cmd, deps and params (not of the outputs' presence)."""
    blob = json.dumps({k: fingerprint[k] for k in ("cmd", "deps", "params")}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass
class DvcStageInputs(CachePolicy):
    """Cache policy: the key of a task is the DVC fingerprint of its stage (see module docstring).

    The task must take ``params`` (a :class:`Params`) among its inputs; ``stage`` names the dvc.yaml stage.
    """

    stage: str = ""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        params = inputs.get("params")
        if not isinstance(params, Params):
            return None  # not a stage task: no caching
        return f"{self.stage.replace('@', '-')}-{fingerprint_key(stage_fingerprint(self.stage, params))}"


# --------------------------------------------------------------------------- stage tasks


def result_storage(cfg: OrchestrationConfig, root: Path | None = None) -> LocalFileSystem:
    """The folder where task results persist, as a saved Prefect block (Prefect requires saved storage)."""
    path = ((root or project_root()) / cfg.results).resolve()
    path.mkdir(parents=True, exist_ok=True)
    name = "visionflow-results-" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    block = LocalFileSystem(basepath=str(path))
    block.save(name, overwrite=True)
    return block


def plain(result: Any) -> Any:
    """A stage's return value as JSON data (Paths and numpy scalars as str/float), for the JSON result store."""
    return json.loads(json.dumps(result, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def stage_task(fn: Callable[..., Any], stage: str, params: Params) -> Task:
    """Wrap a stage body ``fn(params, ...) -> dict`` as a Prefect task configured from ``params.orchestration``.

    The body's return value is made JSON-plain and timed (``_seconds`` is added); results persist as
    JSON under ``orchestration.results`` with :class:`DvcStageInputs` keys when ``orchestration.cache``.
    """
    cfg = params.orchestration

    def body(params: Params, **kwargs: Any) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            result = plain(fn(params, **kwargs)) or {}
        finally:  # failed stages count as stage time too: the flow measures the time spent outside stages
            end = time.perf_counter()
            STAGE_SPANS.setdefault(stage, []).append((start, end))
        if not isinstance(result, dict):
            result = {"result": result}
        result["_seconds"] = round(end - start, 2)
        return result

    body.__name__ = body.__qualname__ = f"stage_{stage.replace('@', '_')}"
    options: dict[str, Any] = {
        "name": stage,
        "task_run_name": stage,
        "retries": cfg.retries,
        "retry_delay_seconds": cfg.retry_delay_seconds,
        "retry_condition_fn": retry_transient,
    }
    if cfg.cache:
        storage = result_storage(cfg)
        policy = DvcStageInputs(stage=stage).configure(key_storage=str(Path(storage.basepath) / "keys"))
        options.update(cache_policy=policy, persist_result=True, result_serializer="json", result_storage=storage)
    else:
        from prefect.cache_policies import NO_CACHE

        options.update(cache_policy=NO_CACHE, persist_result=False)
    return task(**options)(body)


def needs_refresh(stage: str, params: Params) -> bool:
    """True when a stage's outputs are missing: run it even if its cache key hits."""
    return not stage_fingerprint(stage, params)["outs_present"]


def set_lineage_env(*, flow_run_id: str | None = None, parent_run_id: str | None = None) -> None:
    """Expose the Prefect flow run and the pipeline's MLflow run to the stages (``components.tracking`` reads them)."""
    from components.tracking import FLOW_RUN_ENV, PARENT_RUN_ENV

    if flow_run_id:
        os.environ[FLOW_RUN_ENV] = flow_run_id
    if parent_run_id:
        os.environ[PARENT_RUN_ENV] = parent_run_id
