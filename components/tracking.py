"""The only module that imports mlflow: runs, lineage, pyfunc models, the registry and the promotion gate.

Stages open a run with :func:`start_run` and log through the returned :class:`RunLogger`; the
training engine never imports mlflow, it receives ``logger.log_metrics`` as a callback. The
tracking URI comes from params (``tracking.uri``), else ``$MLFLOW_TRACKING_URI``, else a local
sqlite database ``mlflow.db`` in the working directory (MLflow 3's file store is deprecated).

Lineage (the link between MLflow, DVC, git and Prefect) is a set of run and model-version tags:

* ``visionflow.git_commit`` (also ``mlflow.source.git.commit``) and ``visionflow.git_dirty``;
* ``visionflow.data_hash``: the DVC hash (``md5`` of a directory, ``.dir`` suffix, as ``dvc.lock``
  records it) of the dataset the run read; the same value is the digest of the run's MLflow
  dataset input (:meth:`RunLogger.log_dataset`);
* ``visionflow.params_hash``: a content hash of the params section the stage read;
* ``visionflow.prefect_flow_run_id``: the Prefect flow run that started it, and ``mlflow.parentRunId``
  for the pipeline's parent run: a :class:`RunContext` argument of :func:`start_run` (the CLI builds
  it from the environment the retrain flow gives each stage process).

Registered models are MLflow *pyfunc* models logged "from code" (no pickle: a consumer loads
them without ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``), carrying the checkpoint as an artifact
and the ``components`` package as code, so ``mlflow.pyfunc.load_model("models:/NAME@champion")``
works in a process without this repository and ``mlflow models serve`` answers HTTP requests.
"""

from __future__ import annotations

import base64
import functools
import importlib.metadata
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from components.config import Gate, TrackingConfig
from components.errors import TrackingError

DEFAULT_DB = "mlflow.db"
COMPONENTS_DIR = Path(__file__).resolve().parent
TAG_PREFIX = "visionflow."
CHECKPOINT_SHA_TAG = "visionflow.checkpoint_sha256"  # a version's identity: sha256 of the stage's checkpoint bytes
ONNX_TAG = "visionflow.onnx_artifact"  # a version's ONNX file: runs:/<register run>/onnx/<model>.onnx
ONNX_ARTIFACT_PATH = "onnx"


@dataclass(frozen=True)
class RunContext:
    """Who started a stage: the Prefect flow run and the pipeline's MLflow parent run.

    Passed as an argument from the edge (the CLI reads it from the environment the retrain flow
    gives each stage process); ``RunContext()`` for a stage run by hand or by ``dvc repro``.
    """

    flow_run_id: str | None = None
    parent_run_id: str | None = None


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """params ``tracking.uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db`` (absolute path)."""
    if cfg.uri:
        return cfg.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (or ``a_b`` with ``sep="_"``): MLflow params and metrics are flat keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}".replace(" ", "_")
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}{sep}", sep))
        else:
            out[name] = value
    return out


def connect(cfg: TrackingConfig) -> str:
    """Point MLflow (tracking and registry) at the configured store and make sure the experiment exists.

    Returns:
        The tracking URI in use.

    Raises:
        TrackingError: the store or server cannot be reached or used.
    """
    import mlflow

    uri = resolve_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)  # the registry follows the tracking URI (MLflow's default)
    try:
        if mlflow.get_experiment_by_name(cfg.experiment) is None:
            location = cfg.artifact_location
            if location is None and uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
            try:
                mlflow.create_experiment(cfg.experiment, artifact_location=location)
            except mlflow.exceptions.MlflowException:
                if mlflow.get_experiment_by_name(cfg.experiment) is None:  # not a lost race with a parallel task
                    raise
        mlflow.set_experiment(cfg.experiment)
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise TrackingError(
            f"tracking store unusable: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
            file=uri,
            fix="start the server or set tracking.uri / MLFLOW_TRACKING_URI",
        ) from None
    return uri


# --------------------------------------------------------------------------- lineage


@functools.lru_cache(maxsize=8)
def git_revision(root: str = ".") -> tuple[str, bool]:
    """``(commit sha, dirty)`` of the repository holding ``root``; ``("unknown", False)`` outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return commit, bool(status.strip())


def dvc_hash(path: str | Path) -> str:
    """The DVC hash of a file or directory, exactly as ``dvc.lock`` records it for an ``outs``/``deps`` entry.

    A file's hash is its md5; a directory's is the md5 of DVC's sorted JSON listing of
    ``{relpath, md5}`` entries, suffixed ``.dir`` (``dvc_data``'s own tree builder computes it).

    Raises:
        TrackingError: the path does not exist.
    """
    from components import io

    path = Path(path).resolve()
    if not path.exists():
        raise TrackingError("cannot hash a missing path", file=path, fix="run the stage that writes it first")
    return io.dvc_hash(path)


def section_hash(section: Any) -> str:
    """A content hash of one params section (a pydantic record or a mapping), stable across runs."""
    from components.io import content_hash

    return content_hash(section.model_dump(mode="json") if hasattr(section, "model_dump") else dict(section))


def provenance_tags(
    *, params_hash: str | None = None, data_hash: str | None = None, root: str | Path | None = None, flow_run_id: str | None = None
) -> dict[str, str]:
    """The provenance tags of a run or model version: git commit, DVC data hash, params hash, Prefect flow run.

    The commit is that of the repository holding the code that runs (``components/``), unless ``root`` is given.
    """
    commit, dirty = git_revision(str(Path(root or COMPONENTS_DIR.parent).resolve()))
    tags = {
        f"{TAG_PREFIX}git_commit": commit,
        f"{TAG_PREFIX}git_dirty": str(dirty).lower(),
        "mlflow.source.git.commit": commit,
    }
    if params_hash:
        tags[f"{TAG_PREFIX}params_hash"] = params_hash
    if data_hash:
        tags[f"{TAG_PREFIX}data_hash"] = data_hash
    if flow_run_id:
        tags[f"{TAG_PREFIX}prefect_flow_run_id"] = flow_run_id
    return tags


# --------------------------------------------------------------------------- runs


def _tracking_call(method: Any) -> Any:
    """Turn a failure of the tracking server during a run into a :class:`TrackingError` naming the URI.

    MLflow's HTTP client has already retried with back-off (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
    ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``) when this fires: the server stayed down. The stage
    fails with one line instead of a urllib3 traceback; its flow task retries (TrackingError is
    transient) and a resumed run continues from ``last.pt``.
    """

    @functools.wraps(method)
    def wrapper(self: RunLogger, *args: Any, **kwargs: Any) -> Any:
        import mlflow

        try:
            return method(self, *args, **kwargs)
        except (mlflow.exceptions.MlflowException, OSError) as err:
            raise TrackingError(
                f"tracking server failed during run {self.run_id} ({method.__name__}): {str(err).splitlines()[0][:300] if str(err) else type(err).__name__}",
                file=mlflow.get_tracking_uri(),
                record=self.run_id,
                fix="start the server (or fix tracking.uri) and re-run the stage with --resume; nothing was registered",
            ) from None

    return wrapper


def _is_unique_violation(err: BaseException) -> bool:
    """Whether a tracking error is a database unique-constraint violation (sqlite, PostgreSQL, MySQL; direct or via a server)."""
    text = f"{err} {err.__cause__ or ''}"
    return "IntegrityError" in text or "UNIQUE constraint failed" in text or "duplicate key" in text.lower()


def _log_inputs_racing(client: Any, run_id: str, datasets: list[Any], attempts: int = 3) -> None:
    """``client.log_inputs`` that survives another process logging the same dataset at the same moment.

    MLflow's SQL store looks a dataset up by (experiment, name, digest) and inserts it when absent,
    in one transaction: two stages that log the same dataset to the same experiment at once (two
    workspaces, parallel stages of a flow) can both miss it and the second insert fails on the
    unique constraint. The dataset then exists, so the call is repeated and links the run to it.
    """
    import mlflow

    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except mlflow.exceptions.MlflowException as err:
            if attempt == attempts - 1 or not _is_unique_violation(err):
                raise
            time.sleep(0.1 * (attempt + 1))


class RunLogger:
    """Thin handle on an active MLflow run; every stage logs through it.

    Every method raises :class:`TrackingError` (naming the tracking URI and the run) when the
    server fails during the run.
    """

    def __init__(self, run: Any):
        self._run = run

    @property
    def run_id(self) -> str:
        return self._run.info.run_id

    @_tracking_call
    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        flat = {k: ("null" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            mlflow.log_params(dict(items[i : i + 100]), run_id=self.run_id)

    @_tracking_call
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, *, sep: str = ".") -> None:
        """Log the numbers of a (nested) dict; nested keys are joined with ``sep``, non-numbers skipped."""
        import mlflow

        flat = flatten(metrics, sep=sep).items()
        clean = {k.replace("@", "_at_"): float(v) for k, v in flat if isinstance(v, (int, float)) and not isinstance(v, bool)}
        clean = {k: v for k, v in clean.items() if math.isfinite(v)}
        if clean:
            mlflow.log_metrics(clean, step=step, run_id=self.run_id)

    @_tracking_call
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path, run_id=self.run_id)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_path, run_id=self.run_id)

    @_tracking_call
    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        import mlflow

        mlflow.log_dict(dict(data), name, run_id=self.run_id)

    @_tracking_call
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow import MlflowClient

        client = MlflowClient()
        for key, value in tags.items():
            client.set_tag(self.run_id, key, str(value))

    @_tracking_call
    def log_dataset(
        self, *, name: str, digest: str | None = None, source: str | Path, profile: Mapping[str, Any] | None = None, context: str = "training"
    ) -> str:
        """Record a dataset folder as an MLflow dataset input whose digest is its DVC hash.

        Args:
            name: the dataset's name (e.g. ``shapes``).
            digest: its DVC hash; computed with :func:`dvc_hash` when omitted.
            source: the dataset folder.
            profile: statistics shown with the input (images, objects per class, ...).
            context: ``training``, ``validation`` or ``test``.

        Returns:
            The digest (also set as the run's ``visionflow.data_hash`` tag).
        """
        import json

        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset as DatasetEntity
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.tracking import MlflowClient

        digest = digest or dvc_hash(source)
        uri = Path(source).resolve().as_uri()
        try:
            from mlflow.data.dataset_source_registry import resolve_dataset_source

            src = resolve_dataset_source(uri)
        except Exception:  # noqa: BLE001 - mlflow raises its own error when no registered source type accepts the URI
            from mlflow.data.http_dataset_source import HTTPDatasetSource

            src = HTTPDatasetSource(uri)
        dataset = MetaDataset(source=src, name=name, digest=digest[:36])
        base = dataset._to_mlflow_entity()
        entity = DatasetEntity(
            name=base.name, digest=base.digest, source_type=base.source_type, source=base.source, schema=base.schema,
            profile=json.dumps(dict(profile), default=str)[:5000] if profile else base.profile,
        )
        _log_inputs_racing(MlflowClient(), self.run_id, [DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])
        self.set_tags({f"{TAG_PREFIX}data_hash": digest, f"{TAG_PREFIX}data_path": str(source)})
        if profile:
            self.log_dict(dict(profile), f"datasets/{name}_profile.json")
        return digest

    @_tracking_call
    def log_provenance(self, *, section: Any = None, dataset: str | Path | None = None, dataset_name: str | None = None) -> dict[str, str]:
        """Tag the run with the params hash of ``section`` and the DVC hash of ``dataset`` (logged as input)."""
        tags = provenance_tags(params_hash=section_hash(section) if section is not None else None)
        self.set_tags(tags)
        if dataset is not None and Path(dataset).exists():
            tags[f"{TAG_PREFIX}data_hash"] = self.log_dataset(name=dataset_name or Path(dataset).name, source=dataset)
        return tags


@contextmanager
def start_run(
    cfg: TrackingConfig,
    *,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    nested: bool = False,
    context: RunContext | None = None,
) -> Iterator[RunLogger]:
    """Open (or resume, with ``run_id``) an MLflow run in the configured experiment.

    The run is tagged with the git commit and, from ``context``, the Prefect flow-run id; the
    context's parent run id (the retrain flow's MLflow run) makes the stage's run its child,
    although the stage runs in another process.
    A run that raises ends ``FAILED`` (MLflow's context manager), which the registry respects.

    Under torchrun (a process group of ``W > 1`` ranks) this is a collective: rank 0 opens the run
    and broadcasts its id, ranks 1..W-1 receive a :class:`WorkerRunLogger` that carries the same
    ``run_id`` (so checkpoints record it) and logs nothing: one MLflow run per job.

    Raises:
        TrackingError: the tracking server cannot be reached.
    """
    if _process_group_rank() is not None:
        with _start_run_on_rank_zero(cfg, run_name=run_name, tags=tags, run_id=run_id, nested=nested, context=context) as logger:
            yield logger
        return
    with _open_run(cfg, run_name=run_name, tags=tags, run_id=run_id, nested=nested, context=context) as logger:
        yield logger


@contextmanager
def _open_run(
    cfg: TrackingConfig, *, run_name: str, tags: Mapping[str, Any] | None, run_id: str | None, nested: bool, context: RunContext | None = None
) -> Iterator[RunLogger]:
    """What :func:`start_run` does in a single process (or on rank 0 of a torchrun job)."""
    import mlflow

    connect(cfg)
    context = context or RunContext()
    all_tags: dict[str, Any] = {**provenance_tags(flow_run_id=context.flow_run_id), **dict(tags or {})} if run_id is None else dict(tags or {})
    parent = context.parent_run_id
    if parent and run_id is None and not nested and mlflow.active_run() is None:
        all_tags.setdefault("mlflow.parentRunId", parent)
    try:
        run_ctx = mlflow.start_run(
            run_id=run_id, run_name=None if run_id else run_name, nested=nested or mlflow.active_run() is not None, tags={k: str(v) for k, v in all_tags.items()} or None
        )
    except mlflow.exceptions.MlflowException as err:
        raise TrackingError(f"cannot open run {run_name!r}: {str(err).splitlines()[0]}", file=resolve_tracking_uri(cfg), fix="check tracking.uri") from None
    with run_ctx as run:  # ends the run FINISHED, or FAILED when the body raises
        try:
            yield RunLogger(run)
        except BaseException as body_error:
            _end_run(run, "FAILED", cfg, after=body_error)
            raise
        _end_run(run, "FINISHED", cfg)


def _end_run(run: Any, status: str, cfg: TrackingConfig, *, after: BaseException | None = None) -> None:
    """End ``run`` with ``status``; a server that died during the run is a :class:`TrackingError`, not a traceback.

    ``mlflow.end_run`` pops the run from the active stack before it calls the server, so a run
    whose end could not be logged does not stay active in this process.
    """
    import mlflow

    try:
        mlflow.end_run(status)
    except (mlflow.exceptions.MlflowException, OSError) as err:
        if isinstance(after, TrackingError):
            return  # the server was already gone: the body's TrackingError (raised next) names the first failure
        cause = f"; the stage had failed: {after}" if after is not None else ""
        raise TrackingError(
            f"tracking server failed while ending run {run.info.run_id} as {status}: "
            f"{str(err).splitlines()[0][:300] if str(err) else type(err).__name__}{cause}",
            file=resolve_tracking_uri(cfg),
            record=run.info.run_id,
            fix="start the server (or fix tracking.uri) and re-run the stage with --resume; nothing was registered",
        ) from None


# --------------------------------------------------------------------------- torchrun: one run, logged by rank 0


class WorkerRunLogger(RunLogger):
    """The logger of ranks 1..W-1 of a torchrun job: it knows rank 0's run id and logs nothing.

    Every rank runs the same stage code; only rank 0 talks to MLflow, so a job of ``W`` processes
    is one MLflow run (not ``W``), with one copy of each metric, param and artifact.
    """

    def __init__(self, run_id: str):
        self._run_id = run_id

    @property
    def run_id(self) -> str:
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, *, sep: str = ".") -> None:
        return None

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        return None

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        return None

    def log_dataset(self, *, name: str, digest: str | None = None, source: str | Path, profile: Mapping[str, Any] | None = None,
                    context: str = "training") -> str:
        return digest or ""

    def log_provenance(self, *, section: Any = None, dataset: str | Path | None = None, dataset_name: str | None = None) -> dict[str, str]:
        return {}


def _process_group_rank() -> int | None:
    """This process's rank inside a torch.distributed group of more than one process, else None.

    Looked up without importing torch: a process that has not imported ``torch.distributed``
    cannot be in a group (light commands stay light).
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return int(dist.get_rank())


@contextmanager
def _start_run_on_rank_zero(
    cfg: TrackingConfig, *, run_name: str, tags: Mapping[str, Any] | None, run_id: str | None, nested: bool, context: RunContext | None = None
) -> Iterator[RunLogger]:
    """Rank 0 opens the run and broadcasts its id; the other ranks get a :class:`WorkerRunLogger`.

    A collective: every rank of the group must call :func:`start_run` at the same point of the
    stage (they all run the same code). When rank 0 cannot open the run, every rank raises.
    """
    from components.distributed import is_main_process, run_on_main

    with ExitStack() as stack:
        logger = None

        def open_on_main() -> str:
            nonlocal logger
            logger = stack.enter_context(_open_run(cfg, run_name=run_name, tags=tags, run_id=run_id, nested=nested, context=context))
            return logger.run_id

        shared_id = run_on_main(open_on_main)
        yield logger if is_main_process() and logger is not None else WorkerRunLogger(shared_id)


def run_status(cfg: TrackingConfig, run_id: str) -> str | None:
    """``FINISHED``, ``FAILED``, ``KILLED``, ``RUNNING`` of a run, or None when it does not exist."""
    import mlflow

    connect(cfg)
    try:
        return mlflow.MlflowClient().get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        return None


# --------------------------------------------------------------------------- pyfunc models

PYFUNC_CODE = '''"""visionflow pyfunc model, logged as code (MLflow models-from-code: nothing is pickled).

Input: a DataFrame with a column ``image``: per row encoded PNG/JPEG bytes, their base64 text (what
JSON carries), or a pixel array [H, W] / [H, W, 3]. Output: one row per image (see
components/stages/predict.py for the columns of each task).

``predict`` is type-hinted ``pd.DataFrame -> pd.DataFrame``: MLflow 3 infers no signature from a
DataFrame hint and wraps no validation around it, so the explicit signature logged with the model
(``image`` column of any type, the task's output columns) stays the one ``mlflow models serve``
enforces; the scoring server turns a JSON request (``dataframe_split``, ``dataframe_records``,
``inputs``) into that DataFrame before calling ``predict``.
"""

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext


class VisionflowModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        from components.stages.predict import ImagePredictor

        config = context.model_config or {}
        self.predictor = ImagePredictor.from_checkpoint(context.artifacts["checkpoint"], device=config.get("device", "auto"))

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = list(model_input["image"] if "image" in model_input.columns else model_input.iloc[:, 0])
        return pd.DataFrame(self.predictor.predict(images))


mlflow.models.set_model(VisionflowModel())
'''


def _output_schema(task: str, instance: bool) -> Any:
    from mlflow.types.schema import Array, ColSpec, DataType, Object, Property, Schema

    if task == "backbone":
        return Schema([ColSpec(Array(DataType.double), "embedding")])
    if task == "classification":
        return Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "score"), ColSpec(Array(DataType.double), "probabilities")])
    if task == "segmentation" and not instance:
        return Schema([ColSpec(Array(Array(DataType.long)), "mask")])
    cols = [ColSpec(Array(Array(DataType.double)), "boxes"), ColSpec(Array(DataType.string), "labels"), ColSpec(Array(DataType.double), "scores")]
    if instance:
        rle = Object([Property("size", Array(DataType.long)), Property("counts", DataType.string)])
        cols.append(ColSpec(Array(rle), "masks"))
    return Schema(cols)


def pyfunc_signature(task: str, *, instance: bool = False) -> Any:
    """The model signature: input column ``image`` (any: bytes, base64 text or array), task-specific outputs."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec(AnyType(), "image")]), outputs=_output_schema(task, instance))


def _requirements() -> list[str]:
    """Pinned requirements of the served model (the versions this environment runs)."""
    reqs = []
    for dist in ("mlflow", "torch", "torchvision", "numpy", "pandas", "pillow", "pycocotools", "pydantic", "pyyaml"):
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def log_pyfunc_model(
    *,
    checkpoint: str | Path,
    task: str,
    example_images: Sequence[bytes],
    name: str = "model",
    instance: bool = False,
    model_config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Log a checkpoint as a pyfunc model (in the active run) that predicts on images.

    The model is logged from code with ``artifacts={"checkpoint": ...}`` and
    ``code_paths=[components]``, so loading needs neither pickle nor this repository.

    Args:
        checkpoint: the stage's checkpoint file (rebuilt by ``components.engine.load_model``).
        task: ``backbone``, ``classification``, ``detection`` or ``segmentation``.
        example_images: encoded images (PNG/JPEG bytes) for the input example (base64 in the model).
        name: the logged model's name.
        instance: the model predicts instance masks (Mask R-CNN).
        model_config: passed to the model on load (``device``).
        metadata: stored in the MLmodel file (categories, metrics, recipe).

    Returns:
        The logged model's URI (``models:/m-...``).

    Raises:
        TrackingError: MLflow refused the model.
    """
    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="visionflow-pyfunc-") as tmp:
        code = Path(tmp) / "visionflow_model.py"
        code.write_text(PYFUNC_CODE)
        example = pd.DataFrame({"image": [base64.b64encode(b).decode("ascii") for b in example_images]})
        try:
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(code),
                artifacts={"checkpoint": str(Path(checkpoint).resolve())},
                code_paths=[str(COMPONENTS_DIR)],
                signature=pyfunc_signature(task, instance=instance),
                input_example=example,
                pip_requirements=_requirements(),
                model_config=dict(model_config or {"device": "auto"}),
                metadata=dict(metadata or {}),
            )
        except mlflow.exceptions.MlflowException as err:
            raise TrackingError(f"cannot log model: {str(err).splitlines()[0]}", file=checkpoint, fix="check the checkpoint loads with `visionflow predict`") from None
    return info.model_uri


def load_pyfunc(model_uri: str, cfg: TrackingConfig | None = None) -> Any:
    """``mlflow.pyfunc.load_model`` with a one-line error naming the URI.

    Raises:
        TrackingError: no such model, alias or version.
    """
    import mlflow

    if cfg is not None:
        connect(cfg)
    elif os.environ.get("MLFLOW_TRACKING_URI") is None and mlflow.get_tracking_uri().startswith("file:"):
        mlflow.set_tracking_uri(resolve_tracking_uri(TrackingConfig()))
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise TrackingError(
            f"cannot load model: {str(err).splitlines()[0]}", file=model_uri, fix="list versions with the MLflow UI or `mlflow models` and check the alias"
        ) from None


# --------------------------------------------------------------------------- registry and gate


def register_version(
    model_uri: str,
    registered_name: str,
    *,
    version_description: str,
    model_description: str | None = None,
    tags: Mapping[str, Any] | None = None,
    alias: str = "candidate",
) -> str:
    """Create a version of ``registered_name`` from a logged model, set ``alias`` on it, return its number.

    All or nothing, as far as the registry allows: when a step after the version's creation fails
    (description, alias), the version is deleted again, so no half-registered version remains;
    if the server is gone even for that, the version has no alias and the error says so.

    Raises:
        TrackingError: the registry refused the version.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    mv = None
    try:
        try:
            client.get_registered_model(registered_name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(registered_name, description=model_description)
        mv = mlflow.register_model(model_uri, registered_name, tags={k: str(v) for k, v in (tags or {}).items()})
        client.update_model_version(registered_name, mv.version, description=version_description)
        if model_description:
            client.update_registered_model(registered_name, description=model_description)
        client.set_registered_model_alias(registered_name, alias, mv.version)
    except (mlflow.exceptions.MlflowException, OSError) as err:
        rolled_back = mv is None or _delete_version(client, registered_name, str(mv.version))
        left = "" if rolled_back else f"; version {mv.version} could not be deleted: it has no '{alias}' alias, so no consumer loads it"
        raise TrackingError(
            f"cannot register {registered_name}: {str(err).splitlines()[0][:300] if str(err) else type(err).__name__}{left}",
            file=mlflow.get_tracking_uri(), record=registered_name, fix="check the registry URI / server and re-run `visionflow register`",
        ) from None
    return str(mv.version)


def _delete_version(client: Any, registered_name: str, version: str) -> bool:
    """Roll back a half-registered version (created, but its card or alias failed); False when the registry refuses."""
    import mlflow

    try:
        client.delete_model_version(registered_name, version)
    except (mlflow.exceptions.MlflowException, OSError):
        return False
    return True


@dataclass(frozen=True)
class ChampionMeasure:
    """The champion as measured for one candidate, before the gate decides.

    Attributes:
        version: the version holding the champion alias when it was measured; None: no champion yet.
        value: its gate metric on the candidate's test data (None when not comparable).
        method: ``evaluated`` (rebuilt from its checkpoint and run through the stage's evaluator on
            the candidate's test split), ``recorded`` (its own number, measured on data with the
            same DVC hash), ``incomparable`` or ``none`` (no champion).
        note: one line: why incomparable, or how it was measured.
        categories: the champion's class list (None when unknown).
    """

    version: str | None
    value: float | None = None
    method: str = "none"
    note: str = ""
    categories: tuple[str, ...] | None = None


@dataclass(frozen=True)
class GateDecision:
    """The outcome of the promotion gate for one candidate version.

    The candidate is promoted when its metric beats the champion's by at least ``margin``
    (``candidate - champion >= margin`` and ``> 0`` for higher-is-better metrics, mirrored
    otherwise), or when there is no champion yet; a missing or non-finite metric never promotes.
    When the champion could not be measured on the candidate's test data (``comparison ==
    "incomparable"``), no numbers are compared: ``register.on_incomparable`` decides.
    """

    model: str
    candidate_version: str
    champion_version: str | None
    metric: str
    candidate_value: float | None
    champion_value: float | None
    margin: float
    higher_is_better: bool
    promoted: bool
    reason: str
    comparison: str = "recorded"
    test_data_hash: str | None = None

    @property
    def decision(self) -> str:
        return "promoted" if self.promoted else "kept"

    def as_tags(self) -> dict[str, str]:
        tags = {f"gate.{k}": ("" if v is None else str(v)) for k, v in asdict(self).items() if k != "model"}
        tags["gate.decision"] = self.decision
        return tags


def _finite(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def decide_promotion(
    *,
    model: str,
    candidate_version: str,
    candidate_value: Any,
    champion_version: str | None,
    champion_value: Any,
    gate: Gate,
    incomparable: str | None = None,
    on_incomparable: str = "promote",
    comparison: str = "recorded",
    test_data_hash: str | None = None,
) -> GateDecision:
    """Pure gate logic (no registry access): see :class:`GateDecision`.

    Args:
        incomparable: why the champion could not be measured on the candidate's test data; then
            ``on_incomparable`` (``promote`` or ``keep``) decides instead of the numbers.
    """
    cand, champ = _finite(candidate_value), _finite(champion_value)
    common = dict(model=model, candidate_version=candidate_version, champion_version=champion_version, metric=gate.metric,
                  candidate_value=cand, champion_value=champ, margin=gate.margin, higher_is_better=gate.higher_is_better,
                  test_data_hash=test_data_hash)
    if cand is None:
        return GateDecision(**common, promoted=False, reason=f"candidate has no finite {gate.metric}", comparison=comparison)  # type: ignore[arg-type]
    if champion_version is None:
        return GateDecision(**common, promoted=True, reason="no champion yet", comparison="none")  # type: ignore[arg-type]
    if incomparable is not None:
        common["champion_value"] = None
        promoted = on_incomparable == "promote"
        reason = f"champion v{champion_version} not comparable on this test data ({incomparable}); register.on_incomparable={on_incomparable}"
        return GateDecision(**common, promoted=promoted, reason=reason, comparison="incomparable")  # type: ignore[arg-type]
    if champ is None:
        return GateDecision(**common, promoted=True, reason=f"champion v{champion_version} has no finite {gate.metric}", comparison=comparison)  # type: ignore[arg-type]
    gain = cand - champ if gate.higher_is_better else champ - cand
    if gain > 0 and gain >= gate.margin:
        reason = f"{gate.metric} {cand:.4f} beats champion v{champion_version} ({champ:.4f}) by {gain:.4f} >= margin {gate.margin}"
        return GateDecision(**common, promoted=True, reason=reason, comparison=comparison)  # type: ignore[arg-type]
    reason = f"{gate.metric} {cand:.4f} vs champion v{champion_version} ({champ:.4f}): gain {gain:.4f} below margin {gate.margin}"
    return GateDecision(**common, promoted=False, reason=reason, comparison=comparison)  # type: ignore[arg-type]


def apply_gate(
    registered_name: str,
    version: str,
    *,
    gate: Gate,
    value: Any,
    champion_alias: str = "champion",
    measured: ChampionMeasure | None = None,
    on_incomparable: str = "promote",
    test_data_hash: str | None = None,
) -> GateDecision:
    """Compare ``version`` with the version holding ``champion_alias``; move the alias only if the gate passes.

    The candidate's value is stored as the version tag ``metric.<name>`` and the decision as
    ``gate.*`` tags on the candidate version (``gate.champion_value``, ``gate.candidate_value``,
    ``gate.test_data_hash``, ``gate.decision``, ``gate.reason``, ...).

    Args:
        measured: the champion measured on the candidate's test data (:class:`ChampionMeasure`);
            when None, the champion's own ``metric.<name>`` tag is compared (the same test data is
            then the caller's responsibility).
        on_incomparable: ``promote`` or ``keep`` when ``measured.method == "incomparable"``.
        test_data_hash: DVC hash of the data both numbers were measured on.

    Raises:
        TrackingError: the registry is unusable.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        client.set_model_version_tag(registered_name, version, f"metric.{gate.metric}", str(value))
        if test_data_hash:
            client.set_model_version_tag(registered_name, version, "gate.test_data_hash", test_data_hash)
        try:
            champion = client.get_model_version_by_alias(registered_name, champion_alias)
        except mlflow.exceptions.MlflowException:
            champion = None
        champ_version = None if champion is None else str(champion.version)
        incomparable, comparison = None, "recorded"
        if measured is None:
            champ_value = None if champion is None else champion.tags.get(f"metric.{gate.metric}")
        elif champ_version != measured.version:  # someone moved the alias while the champion was measured
            champ_value, incomparable = None, f"the champion alias moved to v{champ_version} while v{measured.version} was measured"
        else:
            champ_value, comparison = measured.value, measured.method
            if measured.method == "incomparable":
                incomparable = measured.note
        decision = decide_promotion(
            model=registered_name, candidate_version=str(version), candidate_value=value, champion_version=champ_version,
            champion_value=champ_value, gate=gate, incomparable=incomparable, on_incomparable=on_incomparable,
            comparison=comparison, test_data_hash=test_data_hash,
        )
        if decision.promoted:
            client.set_registered_model_alias(registered_name, champion_alias, str(version))
        for key, tag in {**decision.as_tags(), "gate.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}.items():
            client.set_model_version_tag(registered_name, version, key, tag)
        if measured is not None and measured.note:
            client.set_model_version_tag(registered_name, version, "gate.champion_measure", measured.note[:5000])
    except mlflow.exceptions.MlflowException as err:
        raise TrackingError(f"gate failed for {registered_name} v{version}: {str(err).splitlines()[0]}", record=registered_name, fix="check the registry URI") from None
    return decision


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version as plain data: number, tags, description."""

    name: str
    version: str
    tags: dict[str, str]
    description: str


def _version_info(mv: Any) -> VersionInfo:
    return VersionInfo(name=str(mv.name), version=str(mv.version), tags=dict(mv.tags or {}), description=str(mv.description or ""))


def latest_version(registered_name: str) -> VersionInfo | None:
    """The highest-numbered version of ``registered_name``, or None (no such model or no version).

    Raises:
        TrackingError: the registry is unusable.
    """
    import mlflow
    from mlflow import MlflowClient

    try:
        versions = MlflowClient().search_model_versions(f"name='{registered_name}'")
    except mlflow.exceptions.MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")):
            return None
        raise TrackingError(f"cannot list versions of {registered_name}: {str(err).splitlines()[0]}", record=registered_name, fix="check the registry URI") from None
    if not versions:
        return None
    return _version_info(max(versions, key=lambda mv: int(mv.version)))


def alias_version_info(registered_name: str, alias: str) -> VersionInfo | None:
    """The version holding ``alias`` (number, tags, description), or None (no such model or alias)."""
    if alias.isdigit():
        raise ValueError(f"{alias!r} is a version number, not an alias")
    try:
        return resolve_version(registered_name, alias)
    except TrackingError:
        return None


def download_version_checkpoint(registered_name: str, version: str, dst: str | Path) -> Path:
    """The checkpoint a registered version was logged with (the pyfunc's ``checkpoint`` artifact), downloaded to ``dst``.

    Only the ``MLmodel`` file and the checkpoint are fetched (not the model's copy of the code).

    Raises:
        TrackingError: the version, its ``MLmodel`` or its checkpoint artifact cannot be read.
    """
    import mlflow
    import yaml

    uri = f"models:/{registered_name}/{version}"
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        mlmodel = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/MLmodel", dst_path=str(dst)))
        spec = yaml.safe_load(mlmodel.read_text()) or {}
        rel = spec["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{rel}", dst_path=str(dst)))
    except (mlflow.exceptions.MlflowException, OSError, KeyError, TypeError) as err:
        raise TrackingError(
            f"cannot fetch the checkpoint of {registered_name} v{version}: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
            file=uri, record=registered_name, fix="the version was not logged by visionflow's register stage",
        ) from None


def resolve_version(registered_name: str, ref: str) -> VersionInfo:
    """The version a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` reference names (``ref``: the alias or the number).

    Raises:
        TrackingError: no such model, alias or version.
    """
    import mlflow
    from mlflow import MlflowClient

    try:
        client = MlflowClient()
        mv = client.get_model_version(registered_name, ref) if ref.isdigit() else client.get_model_version_by_alias(registered_name, ref)
    except mlflow.exceptions.MlflowException as err:
        raise TrackingError(f"no version {ref!r} of {registered_name}: {str(err).splitlines()[0][:200]}", file=mlflow.get_tracking_uri(),
                            record=registered_name, fix="list the versions and aliases in the MLflow UI; run `visionflow register` first") from None
    return _version_info(mv)


def attach_onnx(registered_name: str, version: str, onnx_path: str | Path, *, run_id: str | None = None) -> str:
    """Log an exported ONNX file to the run of a registered version (``onnx/``) and tag the version with its URI.

    Args:
        registered_name, version: the registered version the file was exported from.
        onnx_path: the ``.onnx`` file.
        run_id: the run to log into (default: the version's register run, else the version's run).

    Returns:
        The artifact URI ``runs:/<run>/onnx/<file>``, also the version's :data:`ONNX_TAG`.

    Raises:
        TrackingError: the run or the registry refused the artifact or the tag.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        if run_id is None:
            mv = client.get_model_version(registered_name, version)
            run_id = (mv.tags or {}).get(f"{TAG_PREFIX}register_run_id") or mv.run_id
        client.log_artifact(run_id, str(onnx_path), ONNX_ARTIFACT_PATH)
        uri = f"runs:/{run_id}/{ONNX_ARTIFACT_PATH}/{Path(onnx_path).name}"
        client.set_model_version_tag(registered_name, version, ONNX_TAG, uri)
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise TrackingError(f"cannot attach {Path(onnx_path).name} to {registered_name} v{version}: {str(err).splitlines()[0][:200]}",
                            file=onnx_path, record=registered_name, fix="check the tracking store is reachable and the version exists") from None
    return uri


def download_version_onnx(registered_name: str, version: str, dst: str | Path) -> Path | None:
    """The ONNX file of a registered version (its :data:`ONNX_TAG` artifact) downloaded to ``dst``; None when it has none.

    Raises:
        TrackingError: the tag names an artifact that cannot be downloaded.
    """
    import mlflow

    uri = resolve_version(registered_name, version).tags.get(ONNX_TAG)
    if not uri:
        return None
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise TrackingError(f"cannot download {uri}: {str(err).splitlines()[0][:200]}", file=uri, record=registered_name,
                            fix="re-export it with `visionflow export --model models:/NAME/VERSION --format onnx`") from None


def run_tags(cfg: TrackingConfig, run_id: str) -> dict[str, str] | None:
    """The tags of run ``run_id`` (its lineage: git commit, params and data hashes), or None when it does not exist."""
    import mlflow

    connect(cfg)
    try:
        return dict(mlflow.MlflowClient().get_run(run_id).data.tags)
    except mlflow.exceptions.MlflowException:
        return None

