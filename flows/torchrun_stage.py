"""Training stages on several processes: the CLI and the Prefect tasks launch ``torchrun`` when ``train.nprocs > 1``.

One code path serves both callers. The launcher (:func:`launch_stage`) runs the ordinary stage
command, ``python -m flows.cli <stage> ...``, under ``torchrun`` with ``nprocs`` workers; each
worker (:func:`run_as_worker`) joins the process group (gloo on CPU, nccl on CUDA), runs the stage
function with the engine under DDP and leaves the group. Rank 0 alone opens the MLflow run
(:func:`components.tracking.start_run` is a collective under torchrun), writes checkpoints,
metrics and plots, and hands its return value to the launcher through a JSON file named by
``$VISIONFLOW_STAGE_RESULT``, so that ``visionflow pretrain`` prints, and the Prefect task returns,
the same dict as a one-process run.

A Prefect task holds a :class:`~components.config.Params` object, not a command line: it writes
the *effective* params (``--set`` overrides included) to a temporary YAML file and launches
``flows.cli <stage> --params THAT_FILE``, so the workers read exactly what the task read.

Nothing here imports prefect: the CLI uses it too.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from components.config import Params, TrainConfig

#: the file where rank 0 of a launched stage writes the stage's return value (JSON)
RESULT_ENV = "VISIONFLOW_STAGE_RESULT"
#: stages that train with the engine and so may run on several processes


def stage_train_config(stage: str, params: Params, arch: str | None = None) -> TrainConfig | None:
    """The ``train`` settings a stage command trains with, or None when it does not train.

    Args:
        stage: a CLI sub-command / dvc.yaml stage family (``pretrain``, ``detect``, ...).
        params: the effective params.
        arch: ``--arch`` of ``detect``/``segment`` (None: ``--compare``/``--lineage``, no training).
    """
    if stage == "pretrain":
        return params.pretrain.train if params.pretrain.source == "dataset" else None
    if stage == "finetune":
        return params.finetune.train
    if stage in ("detect", "segment") and arch is not None:
        return getattr(params, stage).arch(arch).train
    return None


def launch_stage(
    cli_args: Sequence[str], nprocs: int, *, env: Mapping[str, str] | None = None, timeout: float | None = None, cfg: TrainConfig | None = None
) -> Any:
    """Run ``visionflow <cli_args>`` under torchrun with ``nprocs`` workers; return rank 0's result.

    With ``cfg.nnodes > 1`` this is one node of a job across machines: the other nodes run the
    same command (the scheduler starts it there with their ``$NODE_RANK``), all meet at
    ``cfg.rdzv_endpoint`` (:class:`components.distributed.NodeTopology`), and the call returns
    when the whole job has finished.

    Args:
        cli_args: the stage command after ``visionflow`` (``["pretrain", "--set", "pretrain.train.nprocs=2"]``).
        nprocs: worker processes on this machine (``train.nprocs``).
        env: extra environment variables of the workers.
        timeout: seconds before the job is killed (None: no limit).
        cfg: the stage's ``train`` section, for ``nnodes`` and ``rdzv_endpoint`` (None: this machine alone).

    Returns:
        What the stage function returned on rank 0 (JSON data), or None if it returned nothing
        or global rank 0 ran on another node (its result is in the shared working folder's files).

    Raises:
        TrainingError: a worker failed; the first failing rank's output says why.
    """
    from components.distributed import NodeTopology, launch_torchrun

    nodes = NodeTopology.from_config(cfg, cli_args) if cfg is not None else None
    with tempfile.TemporaryDirectory(prefix="visionflow-torchrun-") as tmp:
        result = Path(tmp) / "result.json"
        launch_torchrun(nprocs, ["-m", "flows.cli", *cli_args], env={**(env or {}), RESULT_ENV: str(result)}, timeout=timeout, nodes=nodes)
        return json.loads(result.read_text()) if result.is_file() else None


def launch_stage_with_params(stage: str, params: Params, nprocs: int, *, extra_args: Sequence[str] = ()) -> Any:
    """:func:`launch_stage` for a caller that holds params, not a command line (the Prefect tasks).

    The effective params are written to a temporary YAML file that the workers load with
    ``--params``; it is removed when the job ends.
    """
    import yaml

    with tempfile.TemporaryDirectory(prefix="visionflow-params-") as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        return launch_stage([stage, "--params", str(path), *extra_args], nprocs)


def run_as_worker(fn: Callable[[], Any], cfg: TrainConfig) -> Any:
    """Run a stage function as one torchrun worker: join the group, run, leave; rank 0 publishes the result.

    Returns:
        The stage's result on rank 0 when it runs on its own; None on the other ranks, and on
        rank 0 when a launcher waits for the result file (the launcher prints or returns it, once).
    """
    from components.distributed import distributed_session, is_main_process

    with distributed_session(cfg.device):
        result = fn()
        main = is_main_process()
    if not main:
        return None
    target = os.environ.get(RESULT_ENV)
    if target:
        from components.plots import write_json

        write_json(json.loads(json.dumps(result, default=str)), Path(target))
        return None
    return result
