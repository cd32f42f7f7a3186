"""The only module that imports mlflow: runs, lineage tags, metrics, artifacts (and, later, pyfunc and registry).

Stages open a run with :func:`start_run` and log through the returned :class:`RunLogger`;
the training engine never imports mlflow, it receives ``logger.log_metrics`` as a callback.
The tracking URI comes from params (``tracking.uri``), else ``$MLFLOW_TRACKING_URI``, else a
local sqlite database ``mlflow.db`` in the working directory (MLflow 3's file store is deprecated).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from components.config import TrackingConfig
from components.errors import TrackingError

DEFAULT_DB = "mlflow.db"


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """params ``tracking.uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db`` (absolute path)."""
    if cfg.uri:
        return cfg.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: MLflow params are flat keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class RunLogger:
    """Thin handle on an active MLflow run; every stage logs through it."""

    def __init__(self, run: Any):
        self._run = run

    @property
    def run_id(self) -> str:
        return self._run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        flat = {k: ("null" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import math

        import mlflow

        clean = {k.replace("@", "_at_"): float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
        clean = {k: v for k, v in clean.items() if math.isfinite(v)}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        import mlflow

        mlflow.log_dict(dict(data), name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_dataset(self, *, name: str, digest: str, source: str, profile: Mapping[str, Any] | None = None, context: str = "training") -> None:
        """Record the dataset as an MLflow dataset input whose digest is the DVC hash of the data."""
        import mlflow
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.http_dataset_source import HTTPDatasetSource  # noqa: F401 - registers sources
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        try:
            src = resolve_dataset_source(str(Path(source).resolve()))
        except Exception:  # noqa: BLE001 - no local source type on this install: fall back to a plain meta dataset
            src = None
        dataset = MetaDataset(source=src, name=name, digest=digest, schema=None) if src is not None else None
        if dataset is None:
            from mlflow.data.code_dataset_source import CodeDatasetSource

            dataset = MetaDataset(source=CodeDatasetSource(tags={"path": str(source)}), name=name, digest=digest)
        mlflow.log_input(dataset, context=context)
        if profile:
            self.log_dict(dict(profile), f"datasets/{name}_profile.json")


@contextmanager
def start_run(
    cfg: TrackingConfig,
    *,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    nested: bool = False,
) -> Iterator[RunLogger]:
    """Open (or resume, with ``run_id``) an MLflow run in the configured experiment.

    A parent run id in ``$VISIONFLOW_PARENT_RUN_ID`` (set by the retrain flow) makes the stage's
    run a child of the pipeline run, also when the stage runs in another process (``dvc repro``).

    Raises:
        TrackingError: the tracking server cannot be reached.
    """
    import mlflow

    uri = resolve_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    try:
        if mlflow.get_experiment_by_name(cfg.experiment) is None:
            location = cfg.artifact_location
            if location is None and uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
            mlflow.create_experiment(cfg.experiment, artifact_location=location)
        mlflow.set_experiment(cfg.experiment)
    except mlflow.exceptions.MlflowException as err:
        raise TrackingError(f"tracking server unusable: {err}", file=uri, fix="start the server or set tracking.uri / MLFLOW_TRACKING_URI") from None
    all_tags = dict(tags or {})
    parent = os.environ.get("VISIONFLOW_PARENT_RUN_ID")
    if parent and run_id is None and not nested:
        all_tags.setdefault("mlflow.parentRunId", parent)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested, tags=all_tags or None) as run:
        yield RunLogger(run)
