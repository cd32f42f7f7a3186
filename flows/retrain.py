"""The retrain flow: ingest -> augment preview -> pretrain -> finetune -> detect (each) -> segment (each)
-> compare -> register, with one MLflow parent run, Prefect artifacts and a skip when nothing changed.

``visionflow run`` calls :func:`run_pipeline`; ``visionflow serve --cron`` calls :func:`serve_pipeline`
(``prefect.yaml`` declares the same deployment for a work pool). Every stage is a task from
:mod:`flows.stages` (DVC-keyed cache, transient-only retries); the independent branches (finetune,
each detector, each segmenter) are submitted together to the task runner of
``orchestration.task_runner`` (a thread pool of ``orchestration.max_workers``).

Lineage, both ways: the parent MLflow run carries the Prefect flow-run id, the git commit, the DVC
hash of every dataset (also as MLflow dataset inputs) and the params hash; each stage's run is its
child; the Prefect markdown artifact lists the MLflow run ids and the registry decisions.

Retraining on new data: when the data's DVC hashes *and* the params hash equal those of the last
successful (``visionflow.outcome = trained``) pipeline run, training is skipped and the run says so,
unless ``force`` (``--force`` or ``orchestration.force``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import allow_failure

from components.config import Params, load_params
from components.errors import TrainingError
from flows.stage_tasks import STAGE_SPANS, needs_refresh, set_lineage_env, stage_task
from flows.stages import STAGE_BODIES

TRAINING_SECTIONS = ("data", "augment", "pretrain", "finetune", "detect", "segment", "evaluate", "register")
DEFAULT_DEPLOYMENT = "visionflow-retrain"
LINEAGE_ARCHS = ("rcnn", "fast_rcnn", "faster_rcnn")  # the lineage stage runs when all three are trained


def submit_stage(stage: str, params: Params, *, wait_for: list[Any] | None = None, **kwargs: Any) -> PrefectFuture:
    """Submit one dvc.yaml stage to the flow's task runner (recomputed when its outputs are missing)."""
    task = stage_task(STAGE_BODIES[stage.split("@")[0]], stage, params)
    if params.orchestration.cache and needs_refresh(stage, params):
        task = task.with_options(refresh_cache=True)
    return task.submit(params, wait_for=wait_for or [], **kwargs)


def data_hashes(params: Params) -> dict[str, str]:
    """DVC hash of every dataset the pipeline ingests: ``{out folder: md5.dir}``."""
    from components.data.versioning import dvc_directory_md5

    folders = [params.data.out, *(ds.out for ds in params.orchestration.datasets.values())]
    return {folder: dvc_directory_md5(Path(folder)) for folder in folders if Path(folder).is_dir()}


def combined_hash(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def last_successful_run(params: Params) -> dict[str, Any] | None:
    """The newest pipeline run that finished training (its tags hold the data and params hashes)."""
    from components.tracking import find_runs

    runs = find_runs(
        params.tracking,
        filter_string="tags.`visionflow.pipeline` = 'retrain' and tags.`visionflow.outcome` = 'trained' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0] if runs else None


def _outcome(future: PrefectFuture) -> dict[str, Any]:
    future.wait()
    state = future.state
    entry: dict[str, Any] = {"state": state.name}
    if state.is_completed():
        entry["result"] = future.result()
        entry["seconds"] = entry["result"].get("_seconds") if state.name != "Cached" else 0.0
    else:
        entry["error"] = str(state.message or state.name)[:500]
    return entry


def _limit_threads(workers: int) -> None:
    """Share the cores between concurrent trainings (torch's pool is per process)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))


def _union_seconds(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _child_runs(params: Params, parent_id: str) -> dict[str, str]:
    from components.tracking import find_runs

    runs = find_runs(params.tracking, filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=200)
    return {r["name"]: r["run_id"] for r in runs}


def _summary_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# visionflow retrain: {report['outcome']}",
        "",
        f"- MLflow parent run: `{report['mlflow_run_id']}` (experiment `{report['experiment']}`, {report['tracking_uri']})",
        f"- Prefect flow run: `{report['flow_run_id']}` · git `{report['git_commit']}` · params hash `{report['params_hash']}`",
        "- data (DVC hashes): " + ", ".join(f"`{k}` {v}" for k, v in report["data_hashes"].items()),
        f"- wall {report['timing']['wall_s']:.1f} s · in stages {report['timing']['stages_s']:.1f} s · "
        f"orchestration overhead {report['timing']['overhead_s']:.1f} s",
    ]
    if report.get("reason"):
        lines += ["", f"**{report['reason']}**"]
    if report.get("stages"):
        lines += ["", "## Stages", "", "| stage | state | seconds | MLflow run |", "| --- | --- | --- | --- |"]
        runs = report.get("mlflow_runs", {})
        for name, entry in report["stages"].items():
            run = next((rid for rname, rid in runs.items() if rname.replace("-", "_").startswith(name.replace("@", "_").replace("-", "_"))), "")
            lines.append(f"| {name} | {entry['state']} | {entry.get('seconds') or 0:.1f} | {run} |")
        lines += ["", "## MLflow runs", "", *(f"- {name}: `{rid}`" for name, rid in sorted(runs.items()))]
    reg = (report.get("register") or {}).get("registered") or {}
    if reg:
        lines += ["", "## Registry", "", "| model | version | gate metric | value | champion before | promoted | decision |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, e in reg.items():
            lines.append(f"| {name} | {e['version']} | {e['metric']} | {e['value']} | {e['champion_version_before']} ({e['champion_value_before']}) | {e['promoted']} | {e['decision']} |")
    refused = (report.get("register") or {}).get("refused") or {}
    if refused:
        lines += ["", "Not registered:", *(f"- {k}: {v}" for k, v in refused.items())]
    failed = [k for k, v in report.get("stages", {}).items() if v["state"] not in ("Completed", "Cached")]
    if failed:
        lines += ["", "## Failed", *(f"- {k}: {report['stages'][k].get('error', '')}" for k in failed)]
    return "\n".join(lines)


def _comparison_rows(result: dict[str, Any] | None) -> list[dict[str, Any]]:
    table = (result or {}).get("architectures") or (result or {}).get("table") or {}
    rows = []
    for arch, metrics in table.items():
        rows.append({"arch": arch, **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}})
    return rows


def _publish(report: dict[str, Any]) -> None:
    create_markdown_artifact(_summary_markdown(report), key="visionflow-retrain-summary", description="retrain summary with MLflow run ids")
    for stage, key in (("detect_compare", "detector-comparison"), ("segment_compare", "segmenter-comparison")):
        rows = _comparison_rows((report.get("stages", {}).get(stage) or {}).get("result"))
        if rows:
            create_table_artifact(rows, key=key, description=f"{stage}: metrics of each architecture on the test split")
    reg = (report.get("register") or {}).get("registered") or {}
    if reg:
        rows = [{"model": k, **{f: e[f] for f in ("version", "metric", "value", "champion_version_before", "champion_value_before", "margin", "promoted", "decision")}} for k, e in reg.items()]
        create_table_artifact(rows, key="registry-decisions", description="candidate vs champion, the gate metric and margin")


@flow(name="visionflow-retrain", log_prints=True)
def retrain_flow(params_path: str = "params.yaml", overrides: list[str] | None = None, force: bool = False) -> dict:
    """Run the whole pipeline once; returns the report also published as Prefect artifacts.

    Raises:
        TrainingError: one or more stages failed (the others' results are registered and reported).
    """
    from components import tracking

    wall_start = time.perf_counter()
    params = load_params(params_path, overrides)
    orch = params.orchestration
    force = force or orch.force
    flow_run_id = flow_run.get_id() or "local"
    set_lineage_env(flow_run_id=flow_run_id)
    params_hash = params.digest(*TRAINING_SECTIONS)
    uri = tracking.connect(params.tracking)
    with tracking.start_run(
        params.tracking, run_name=f"retrain-{flow_run.get_name() or 'local'}", tags={"visionflow.pipeline": "retrain", "visionflow.params_hash": params_hash}
    ) as parent:
        set_lineage_env(parent_run_id=parent.run_id)
        parent.log_params({"params_path": params_path, "overrides": json.dumps(overrides or []), "force": force})
        parent.log_dict(params.model_dump(mode="json"), "params.json")
        report: dict[str, Any] = {
            "mlflow_run_id": parent.run_id, "flow_run_id": flow_run_id, "experiment": params.tracking.experiment, "tracking_uri": uri,
            "git_commit": tracking.git_revision(str(tracking.COMPONENTS_DIR.parent))[0], "params_hash": params_hash, "stages": {},
        }
        stages: dict[str, dict[str, Any]] = report["stages"]
        _limit_threads(1)
        ingests = {"ingest": submit_stage("ingest", params)}
        ingests.update({f"ingest_source@{n}": submit_stage(f"ingest_source@{n}", params, name=n) for n in orch.datasets})
        stages.update({k: _outcome(f) for k, f in ingests.items()})
        hashes = data_hashes(params)
        report["data_hashes"], report["data_hash"] = hashes, combined_hash(hashes)
        for folder, digest in hashes.items():
            parent.log_dataset(name=Path(folder).name, digest=digest, source=folder)
        # after log_dataset (which tags one dataset's hash): the pipeline's tag is the hash of all of them
        parent.set_tags({"visionflow.data_hash": report["data_hash"], **{f"visionflow.data_hash.{Path(k).name}": v for k, v in hashes.items()}})
        last = last_successful_run(params)
        unchanged = last is not None and last["tags"].get("visionflow.data_hash") == report["data_hash"] and last["tags"].get("visionflow.params_hash") == params_hash
        failed_ingest = [k for k, v in stages.items() if v["state"] not in ("Completed", "Cached")]
        if unchanged and not force and not failed_ingest:
            report["outcome"] = "skipped"
            report["reason"] = f"data (DVC {report['data_hash']}) and params ({params_hash}) unchanged since successful run {last['run_id']}: training skipped (use --force to retrain)"
            print(report["reason"])
        else:
            report.update(_train(params, stages, wait_for=list(ingests.values())))
            report["mlflow_runs"] = _child_runs(params, parent.run_id)
        report.setdefault("outcome", "trained" if all(v["state"] in ("Completed", "Cached") for v in stages.values()) else "partial")
        spans = [span for name in stages for span in STAGE_SPANS.get(name, []) if span[0] >= wall_start]
        inside = _union_seconds(spans)
        wall = time.perf_counter() - wall_start
        report["timing"] = {"wall_s": round(wall, 2), "stages_s": round(inside, 2), "overhead_s": round(wall - inside, 2),
                            "per_stage_s": {k: v.get("seconds") for k, v in stages.items()}}
        parent.set_tags({"visionflow.outcome": report["outcome"]})
        parent.log_metrics({"wall_s": wall, "stages_s": inside, "overhead_s": wall - inside})
        parent.log_dict({k: v for k, v in report.items() if k != "stages"} | {"stages": {k: {"state": v["state"], "seconds": v.get("seconds")} for k, v in stages.items()}}, "pipeline_report.json")
        _publish(report)
        failed = [k for k, v in stages.items() if v["state"] not in ("Completed", "Cached")]
        if failed:
            raise TrainingError(
                f"stages failed: {', '.join(failed)}; the others were registered (see the Prefect summary)",
                record=failed[0],
                fix=f"see the error of each stage in MLflow run {parent.run_id} or the Prefect UI",
            )
    return report


def _train(params: Params, stages: dict[str, dict[str, Any]], *, wait_for: list[Any]) -> dict[str, Any]:
    """Submit the training stages with their dependencies; returns ``{"register": ...}``."""
    augment = submit_stage("augment", params, wait_for=wait_for)
    pretrain = submit_stage("pretrain", params, wait_for=wait_for)
    stages["pretrain"] = _outcome(pretrain)
    _limit_threads(params.orchestration.max_workers if params.orchestration.task_runner == "threads" else 1)
    branches: dict[str, PrefectFuture] = {"finetune": submit_stage("finetune", params, wait_for=[pretrain])}
    detectors = {f"detect@{a}": submit_stage(f"detect@{a}", params, arch=a, wait_for=[pretrain]) for a in params.detect.architectures}
    segmenters = {f"segment@{a}": submit_stage(f"segment@{a}", params, arch=a, wait_for=[pretrain]) for a in params.segment.architectures}
    branches.update(detectors)
    branches.update(segmenters)
    compares = {}
    if detectors:
        compares["detect_compare"] = submit_stage("detect_compare", params, wait_for=[allow_failure(f) for f in detectors.values()])
    lineage = [f"detect@{a}" for a in LINEAGE_ARCHS]
    if all(stage in detectors for stage in lineage):
        compares["lineage"] = submit_stage("lineage", params, wait_for=[detectors[stage] for stage in lineage])
    if segmenters:
        compares["segment_compare"] = submit_stage("segment_compare", params, wait_for=[allow_failure(f) for f in segmenters.values()])
    every = [augment, *branches.values(), *compares.values()]
    register = submit_stage("register", params, wait_for=[allow_failure(f) for f in every])
    stages["augment"] = _outcome(augment)
    stages.update({k: _outcome(f) for k, f in {**branches, **compares}.items()})
    stages["register"] = _outcome(register)
    _limit_threads(1)
    return {"register": stages["register"].get("result")}


def _task_runner(params: Params) -> ThreadPoolTaskRunner:
    workers = params.orchestration.max_workers if params.orchestration.task_runner == "threads" else 1
    return ThreadPoolTaskRunner(max_workers=workers)


RUNS_DIR = "runs"
LATEST = "latest"
_SOURCE_FORMATS = ("coco", "voc", "yolo", "imagefolder", "masks")


def _absolute(path: str, root: Path) -> str:
    return str(path if Path(path).is_absolute() else (root / path).resolve())


def run_scoped_params(params: Params, root: Path) -> dict[str, Any]:
    """The params of a run-scoped run: inputs outside the run made absolute, outputs left relative.

    Relative *output* paths (``data.out``, ``<stage>.out``, ``metrics/``, the Prefect results) then
    resolve inside the run's folder; relative *input* paths (source datasets, ``data.source``'s
    folder, ``data.images``) and the default MLflow store are pinned to the project, so every run
    reads the same sources and registers into the same registry. Caching across runs is off (a
    run-scoped folder starts empty, so every stage's outputs are missing anyway).
    """
    from components.tracking import resolve_tracking_uri

    tree = params.model_dump(mode="json")
    for ds in tree["orchestration"]["datasets"].values():
        ds["path"] = _absolute(ds["path"], root)
    fmt, _, where = tree["data"]["source"].partition(":")
    if fmt in _SOURCE_FORMATS and where:
        tree["data"]["source"] = f"{fmt}:{_absolute(where, root)}"
    if tree["data"]["images"]:
        tree["data"]["images"] = _absolute(tree["data"]["images"], root)
    cwd = Path.cwd()
    try:
        os.chdir(root)  # the default sqlite store and artifact folder are the project's
        tree["tracking"]["uri"] = resolve_tracking_uri(params.tracking)
    finally:
        os.chdir(cwd)
    tree["orchestration"].update(run_scoped=False, cache=False)
    return tree


@contextmanager
def run_scoped_workspace(params_path: str | Path, overrides: list[str] | None, *, root: Path | None = None) -> Iterator[tuple[Path, Path]]:
    """Work in a fresh ``runs/<time>-<params hash>-<pid>/`` folder of the project for one pipeline run.

    Two runs started at the same time with different params write into different folders (never
    into each other's ``data/``, ``outputs/``, ``metrics/``), and each one's register stage reads
    its own checkpoints and metrics, so each registers its own model versions. When the run
    ends, ``runs/latest`` is re-pointed at its folder by an atomic rename of a new symbolic link
    (``os.replace``) under an exclusive lock (``runs/.lock``), so a reader always sees a complete
    run and the last run to finish wins. The process changes its working folder for the run:
    one run-scoped run per process (``visionflow run`` is one process per run).

    Yields:
        ``(run folder, its params file)``: the effective params, with inputs made absolute
        (:func:`run_scoped_params`).
    """
    import fcntl

    import yaml

    root = (root or Path.cwd()).resolve()
    params = load_params(params_path, overrides)
    runs = root / RUNS_DIR
    runs.mkdir(exist_ok=True)
    folder = runs / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{params.digest(*TRAINING_SECTIONS)[:8]}-{os.getpid()}"
    folder.mkdir()
    params_file = folder / "params.yaml"
    params_file.write_text(yaml.safe_dump(run_scoped_params(params, root), sort_keys=False))
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        yield folder, params_file
    finally:
        os.chdir(cwd)
    with open(runs / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        link = runs / f".{LATEST}.{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(folder.name)
        os.replace(link, runs / LATEST)


def run_pipeline(params_path: str | Path, overrides: list[str] | None, *, force: bool = False) -> dict:
    """``visionflow run``: the retrain flow once, with the task runner from params.

    With ``orchestration.run_scoped`` the run works in its own ``runs/<run>/`` folder
    (:func:`run_scoped_workspace`); the report's ``run_dir`` names it.

    Returns:
        The run's report (stages, timings, registry decisions, MLflow and Prefect ids).
    """
    params = load_params(params_path, overrides)
    if params.orchestration.run_scoped:
        with run_scoped_workspace(params_path, overrides) as (folder, scoped_params):
            report = run_pipeline(scoped_params, [], force=force)
        return {**report, "run_dir": str(folder)}
    runner_flow = retrain_flow.with_options(task_runner=_task_runner(params))
    report = runner_flow(params_path=str(params_path), overrides=list(overrides or []), force=force)
    return {k: v for k, v in report.items() if k != "stages"} | {"stages": {k: v["state"] for k, v in report["stages"].items()}}


def build_deployment(params_path: str | Path, overrides: list[str] | None, *, cron: str, name: str = DEFAULT_DEPLOYMENT) -> Any:
    """The retrain flow as a deployment with a cron schedule (what ``serve`` serves and a test can apply)."""
    from prefect.schedules import Cron

    from components.errors import ConfigError

    params = load_params(params_path, overrides)
    try:
        schedule = Cron(cron, timezone="UTC")
    except ValueError as err:
        raise ConfigError(f"invalid cron expression {cron!r}: {err}", record="--cron", fix='use five fields, e.g. "0 3 * * 1"') from None
    runner_flow = retrain_flow.with_options(task_runner=_task_runner(params))
    return runner_flow.to_deployment(
        name=name,
        schedule=schedule,
        parameters={"params_path": str(params_path), "overrides": list(overrides or []), "force": False},
        description="visionflow retraining: ingest -> pretrain -> finetune -> detect -> segment -> register (champion gate)",
        tags=["visionflow", "retrain"],
    )


RETRAIN_ENTRYPOINT = "flows/retrain.py:retrain_flow"


def deploy_to_work_pool(
    work_pool: str,
    params_path: str | Path,
    overrides: list[str] | None,
    *,
    name: str = DEFAULT_DEPLOYMENT,
    entrypoint: str = RETRAIN_ENTRYPOINT,
    source: str | Path | None = None,
    cron: str | None = None,
    job_variables: dict[str, Any] | None = None,
) -> Any:
    """Register a flow of this repository as a deployment of ``work_pool``; a worker of that pool runs it.

    The deployment names the code by ``source`` (this checkout by default; a git URL in production,
    ``Flow.from_source`` pulls it) and ``entrypoint``, and carries the params file and overrides as
    its parameters. The same call targets a ``process`` pool here and a ``kubernetes`` or ``docker``
    pool in production: only the pool's base job template (image, resources) differs, set through
    ``job_variables`` or the pool itself (README, "Teams and scale-out").

    Args:
        work_pool: an existing work pool (``prefect work-pool create NAME --type process``).
        params_path, overrides: what the flow run loads (a path the worker can read).
        name: the deployment's name.
        entrypoint: ``path/to/file.py:flow_function`` inside ``source`` (default: the retrain flow).
        source: folder or git URL holding the code (default: this checkout).
        cron: an optional schedule (UTC).
        job_variables: overrides of the pool's job template (env, working_dir, image, ...).

    Returns:
        The deployment id.
    """
    from prefect import Flow

    remote = Flow.from_source(source=str(source or Path(__file__).resolve().parents[1]), entrypoint=entrypoint)
    parameters: dict[str, Any] = {"params_path": str(params_path), "overrides": list(overrides or [])}
    return remote.deploy(
        name,
        work_pool_name=work_pool,
        build=False,
        push=False,
        cron=cron,
        parameters=parameters,
        job_variables=job_variables,
        tags=["visionflow"],
        print_next_steps=False,
    )


def serve_pipeline(params_path: str | Path, overrides: list[str] | None, *, cron: str, name: str = DEFAULT_DEPLOYMENT) -> None:
    """``visionflow serve --cron``: serve the retrain flow on a schedule (blocks until interrupted)."""
    from prefect import serve

    serve(build_deployment(params_path, overrides, cron=cron, name=name))
