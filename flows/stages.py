"""One thin Prefect flow per stage; each calls the stage's component function through a task.

The stage bodies below are the only place the flows touch ``components``: they pick the stage's
params sections and call the entry points named in docs/architecture.md, exactly as the CLI
(``visionflow <stage>``) and ``dvc.yaml``'s ``cmd`` lines do. :func:`stage_task` turns a body into
a task with transient-only retries and DVC-keyed caching; ``flows/retrain.py`` chains them. A
training body whose ``train.nprocs > 1`` launches its stage under torchrun
(:mod:`flows.torchrun_stage`) and returns rank 0's result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from components.config import Params, load_params
from flows.stage_tasks import needs_refresh, set_lineage_env, stage_task

# --------------------------------------------------------------------------- stage bodies: params -> component call


def _launch_if_distributed(stage: str, params: Params, arch: str | None = None) -> dict | None:
    """A training stage with ``train.nprocs > 1`` runs under torchrun (``flows.cli`` workers); returns rank 0's result.

    None when the stage runs here, in this process (one process asked for, or already a worker).
    """
    from components.distributed import should_launch
    from flows.torchrun_stage import launch_stage_with_params, stage_train_config

    cfg = stage_train_config(stage, params, arch)
    if cfg is None or not should_launch(cfg):
        return None
    result = launch_stage_with_params(stage, params, cfg.nprocs, extra_args=("--arch", arch) if arch else ())
    return result if isinstance(result, dict) else {"result": result}


def ingest_body(params: Params) -> dict:
    """``visionflow ingest``: the built-in (or configured) source into ``data.out``."""
    from components.data.ingest import ingest

    cfg = params.data
    return ingest(cfg.source, Path(cfg.out), cfg=cfg, images=cfg.images, strict=cfg.strict, tracking=params.tracking)


def ingest_source_body(params: Params, *, name: str) -> dict:
    """``visionflow ingest --source FORMAT:PATH --out OUT`` for ``orchestration.datasets[name]``."""
    from components.data.ingest import ingest

    ds = params.orchestration.datasets[name]
    return ingest(ds.source, Path(ds.out), cfg=params.data, images=None, strict=params.data.strict, tracking=params.tracking)


def augment_body(params: Params) -> dict:
    from components.augment import write_preview

    return write_preview(Path(params.detect.dataset), params.augment, Path(params.augment.out))


def pretrain_body(params: Params) -> dict:
    from components.stages.pretrain import run_pretrain

    if (launched := _launch_if_distributed("pretrain", params)) is not None:
        return launched
    return run_pretrain(params.pretrain, params.augment, params.tracking, resume=False)


def finetune_body(params: Params) -> dict:
    from components.stages.finetune import run_finetune

    if (launched := _launch_if_distributed("finetune", params)) is not None:
        return launched
    return run_finetune(params.finetune, params.augment, params.tracking, resume=False)


def detect_body(params: Params, *, arch: str) -> dict:
    from components.stages.detect import run_detect

    if (launched := _launch_if_distributed("detect", params, arch)) is not None:
        return launched
    return run_detect(params.detect, arch, params.augment, params.evaluate, params.tracking, resume=False)


def detect_compare_body(params: Params) -> dict:
    from components.stages.detect import compare_detectors

    return compare_detectors(params.detect)


def lineage_body(params: Params) -> dict:
    """``visionflow detect --lineage``: R-CNN -> Fast R-CNN -> Faster R-CNN timed on the test split."""
    from components.stages.lineage import run_lineage

    return run_lineage(params.detect)


def segment_body(params: Params, *, arch: str) -> dict:
    from components.stages.segment import run_segment

    if (launched := _launch_if_distributed("segment", params, arch)) is not None:
        return launched
    return run_segment(params.segment, arch, params.augment, params.tracking, resume=False)


def segment_compare_body(params: Params) -> dict:
    from components.stages.segment import compare_segmenters

    return compare_segmenters(params.segment)


def register_body(params: Params) -> dict:
    from components.stages.register import run_register

    return run_register(params)


def run_stage(stage: str, params: Params, **kwargs: Any) -> dict:
    """Run one dvc.yaml stage as a task in the current flow (cached, retried) and return its result."""
    body = STAGE_BODIES[stage.split("@")[0]]
    task = stage_task(body, stage, params)
    if params.orchestration.cache and needs_refresh(stage, params):
        task = task.with_options(refresh_cache=True)
    return task(params, **kwargs)


STAGE_BODIES = {
    "ingest": ingest_body,
    "ingest_source": ingest_source_body,
    "augment": augment_body,
    "pretrain": pretrain_body,
    "finetune": finetune_body,
    "detect": detect_body,
    "detect_compare": detect_compare_body,
    "lineage": lineage_body,
    "segment": segment_body,
    "segment_compare": segment_compare_body,
    "register": register_body,
}


def _start(params_path: str, overrides: list[str] | None) -> Params:
    params = load_params(params_path, overrides)
    set_lineage_env(flow_run_id=flow_run.get_id())
    return params


def _train_or_compare(family: str, params: Params, arch: str | None) -> dict:
    """``detect``/``segment``: train one architecture (``family@arch``) or compare them (``family_compare``)."""
    if arch is None:
        return run_stage(f"{family}_compare", params)
    return run_stage(f"{family}@{arch}", params, arch=arch)


# --------------------------------------------------------------------------- one flow per stage


@flow(name="visionflow-ingest", log_prints=True)
def ingest_flow(params_path: str = "params.yaml", overrides: list[str] | None = None, source: str | None = None) -> dict:
    """Ingest ``data`` (``source=None``) or one of ``orchestration.datasets`` (its name)."""
    params = _start(params_path, overrides)
    if source is None:
        return run_stage("ingest", params)
    return run_stage(f"ingest_source@{source}", params, name=source)


@flow(name="visionflow-augment", log_prints=True)
def augment_flow(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    return run_stage("augment", _start(params_path, overrides))


@flow(name="visionflow-pretrain", log_prints=True)
def pretrain_flow(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    return run_stage("pretrain", _start(params_path, overrides))


@flow(name="visionflow-finetune", log_prints=True)
def finetune_flow(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    return run_stage("finetune", _start(params_path, overrides))


@flow(name="visionflow-detect", log_prints=True)
def detect_flow(params_path: str = "params.yaml", overrides: list[str] | None = None, arch: str | None = None) -> dict:
    """Train one detector (``arch``), or compare the trained ones (``arch=None``)."""
    return _train_or_compare("detect", _start(params_path, overrides), arch)


@flow(name="visionflow-segment", log_prints=True)
def segment_flow(params_path: str = "params.yaml", overrides: list[str] | None = None, arch: str | None = None) -> dict:
    """Train one segmenter (``arch``), or compare the trained ones (``arch=None``)."""
    return _train_or_compare("segment", _start(params_path, overrides), arch)


@flow(name="visionflow-register", log_prints=True)
def register_flow(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    return run_stage("register", _start(params_path, overrides))
