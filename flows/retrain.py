"""The retrain flow: the stages of ``dvc.yaml`` run as processes, recorded in ``dvc.lock``, with Prefect around them.

One execution path. ``dvc.yaml`` declares the stages; :mod:`components.pipeline` reads the resolved
stages and their graph from DVC. This flow submits one Prefect task per stage, in topological
order, each waiting for the stages it depends on; a task asks DVC whether its stage is up to date
(``dvc status``), and if not runs the stage's ``cmd`` as a child process (the argv ``dvc repro``
would run, in the project root) and then records it in ``dvc.lock`` (``dvc commit``) under a lock.
Concurrency between stages is between processes (``orchestration.max_workers`` at a time), so no
two trainings share a random-number generator; the same inputs give the same model whichever way
the pipeline ran. ``orchestration.task_runner: dask`` hands the same tasks to a Dask cluster
(``prefect-dask``): ``orchestration.address`` names a running scheduler, or a local cluster of
``max_workers`` worker processes is started for the run. A Dask worker only supervises: the stage
is still its own process, started by the task in the worker's environment, in the workspace
``root`` (the same path on every worker: shared storage; README, "Scale-out"). After ``visionflow run``, ``dvc status`` is clean and ``dvc repro`` does nothing;
after ``dvc repro``, ``visionflow run`` trains nothing.

What Prefect adds: schedules (``visionflow serve --cron``), a run on new data (``--watch``),
retries of transient failures (exit code 75: a tracking server down, an I/O error) that continue
from the stage's ``last.pt`` (``--resume``), one MLflow parent run whose id the stage processes
receive, the summary and comparison tables as artifacts.

The parameters are ``params.yaml``'s (DVC's): ``--params FILE`` and ``--set key=value`` are written
there before the run, as ``dvc exp run -S`` does (:func:`components.pipeline.write_effective_params`).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.runtime import task_run as current_task_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from components.config import load_params
from components.errors import TrainingError
from components.pipeline import (
    Stage,
    StageFailed,
    check_stage_run,
    commit_stage,
    describe_changes,
    is_up_to_date,
    load_stages,
    run_stage_command,
    skip_reason,
    stage_command,
    stage_environment,
    stale_stages,
    write_effective_params,
)
from components.run_report import outcome, read_registry, registry_rows, summary_markdown, timing

DEFAULT_DEPLOYMENT = "visionflow-retrain"
PARAMS_FILE = "params.yaml"


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only a stage that exited with the transient exit code."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # noqa: BLE001 - result retrieval can itself fail; treat that exception as the cause
        exc = err
    return isinstance(exc, StageFailed) and exc.transient


@task(name="stage", retry_condition_fn=retry_transient)
def stage_task(stage: Stage, root: str, force: bool, context: dict[str, str]) -> dict[str, Any]:
    """Run one stage unless DVC finds it up to date; record it in ``dvc.lock``.

    Returns:
        ``{"state": "ran" | "up to date" | "skipped", "seconds", "started", "reason"}``.
    """
    logger = get_run_logger()
    project = Path(root)
    if not force and is_up_to_date(project, stage.name):
        return {"state": "up to date", "seconds": 0.0}
    command = stage_command(stage, resume=current_task_run.run_count > 1)
    logger.info("%s: %s", stage.name, command)
    run = run_stage_command(stage.name, command, root=project, env=stage_environment(**context), log=logger.info)
    check_stage_run(run, command)  # raises StageFailed, transient for exit code 75
    commit_stage(project, stage.name)
    reason = skip_reason(project, stage)
    return {"state": "skipped" if reason else "ran", "reason": reason, "seconds": round(run.seconds, 2), "started": run.started}


def _outcome(future: PrefectFuture) -> dict[str, Any]:
    future.wait()
    state = future.state
    if state.is_completed():
        return dict(future.result())
    message = str(state.message or state.name)
    if state.name in ("NotReady", "Pending") or "upstream" in message.lower():
        return {"state": "not run", "reason": "an upstream stage failed", "seconds": 0.0}
    return {"state": "failed", "reason": message[:500], "seconds": 0.0}


def publish(report: dict[str, Any]) -> None:
    """The summary and the registry decisions as Prefect artifacts."""
    create_markdown_artifact(summary_markdown(report), key="visionflow-retrain-summary", description="stages, registry decisions, timing")
    rows = registry_rows(report.get("register") or {})
    if rows:
        create_table_artifact(rows, key="registry-decisions", description="candidate vs champion on the same test split")


def run_stages(stages: list[Stage], root: Path, *, force: bool, context: dict[str, str], retries: int, retry_delay: float) -> dict[str, dict[str, Any]]:
    """Submit every stage after the stages it depends on; returns each one's outcome."""
    runner = stage_task.with_options(retries=retries, retry_delay_seconds=retry_delay)
    futures: dict[str, PrefectFuture] = {}
    for stage in stages:
        wait = [futures[name] for name in stage.upstream if name in futures]
        futures[stage.name] = runner.with_options(task_run_name=stage.name).submit(stage, str(root), force, context, wait_for=wait)
    return {name: _outcome(future) for name, future in futures.items()}


@flow(name="visionflow-retrain", log_prints=True)
def retrain_flow(params_path: str = PARAMS_FILE, overrides: list[str] | None = None, force: bool = False) -> dict:
    """Bring every stage of ``dvc.yaml`` up to date; returns the report also published as Prefect artifacts.

    Raises:
        TrainingError: a stage failed (the stages that did not depend on it ran and were recorded).
    """
    wall_start = time.perf_counter()
    root = Path.cwd()
    if write_effective_params(Path(params_path), list(overrides or []), root / PARAMS_FILE):
        print(f"params.yaml now holds {params_path} with {list(overrides or [])} (the previous one: params.yaml.bak)")
    params = load_params(root / PARAMS_FILE)
    force = force or params.orchestration.force
    stages = load_stages(root)
    stale = {} if force else stale_stages(root)
    report: dict[str, Any] = {"flow_run_id": flow_run.get_id() or "local", "stages": {}, "changes": describe_changes(stale)}
    if not force and not stale:
        report.update(outcome="up to date", reason="dvc status: every stage is up to date; nothing to run (use --force to retrain)")
        report["timing"] = timing({}, time.perf_counter() - wall_start)
        print(report["reason"])
        publish(report)
        return report
    _run_with_parent(report, params, stages, root, force=force, wall_start=wall_start)
    failed = [k for k, v in report["stages"].items() if v["state"] == "failed"]
    if failed:
        raise TrainingError(
            f"stages failed: {', '.join(failed)}: {report['stages'][failed[0]].get('reason', '')}",
            record=failed[0],
            fix=f"fix the cause, then `visionflow run` again (finished stages are recorded in dvc.lock and not re-run); MLflow run {report['mlflow_run_id']}",
        )
    return report


def _run_with_parent(report: dict[str, Any], params: Any, stages: list[Stage], root: Path, *, force: bool, wall_start: float) -> None:
    """Run the stages inside the pipeline's MLflow parent run and fill ``report``."""
    from components import tracking
    from components.data.versioning import dvc_directory_md5

    orch = params.orchestration
    report["git_commit"] = tracking.git_revision(str(root))[0]
    with tracking.start_run(params.tracking, run_name=f"retrain-{flow_run.get_name() or 'local'}", tags={"visionflow.pipeline": "retrain", "visionflow.prefect_flow_run_id": report["flow_run_id"]}) as parent:
        report["mlflow_run_id"] = parent.run_id
        context = {"flow_run_id": report["flow_run_id"], "parent_run_id": parent.run_id}
        report["stages"] = run_stages(stages, root, force=force, context=context, retries=orch.retries, retry_delay=orch.retry_delay_seconds)
        report["outcome"] = outcome(report["stages"])
        report["register"] = read_registry(root) if report["stages"].get("register", {}).get("state") == "ran" else {}
        data = Path(params.data.out)
        if data.is_dir():
            parent.log_dataset(name=data.name, digest=dvc_directory_md5(data), source=str(data))
        report["timing"] = timing(report["stages"], time.perf_counter() - wall_start)
        parent.set_tags({"visionflow.outcome": report["outcome"]})
        parent.log_metrics(report["timing"])
        parent.log_dict(report, "pipeline_report.json")
        publish(report)


def _task_runner(params: Any) -> TaskRunner:
    """The flow's task runner from ``params.orchestration``: threads (the default), sequential, or a Dask cluster.

    ``dask`` with ``address``: the tasks go to that scheduler's workers (started with ``dask worker
    tcp://HOST:8786`` on each machine, from the same checkout and environment). Without ``address``:
    a local cluster of ``max_workers`` worker *processes* (one thread each, no dashboard) lives for
    the flow run. What crosses to a worker is pickled: :func:`stage_task` (by reference: the worker
    imports ``flows.retrain``), a :class:`~components.pipeline.Stage`, the workspace path, ``force``
    and the run-context dict; Prefect's settings (the API URL) travel with each task's context, and
    the MLflow tracking URI is in ``params.yaml`` (or ``$MLFLOW_TRACKING_URI`` of the workers).
    """
    orch = params.orchestration
    if orch.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if orch.address:
            return DaskTaskRunner(address=orch.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": orch.max_workers, "processes": True, "threads_per_worker": 1, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=orch.max_workers if orch.task_runner == "threads" else 1)


def run_pipeline(params_path: str | Path, overrides: list[str] | None, *, force: bool = False) -> dict:
    """``visionflow run``: the retrain flow once, ``orchestration.max_workers`` stage processes at a time (or on a Dask cluster).

    Returns:
        The run's report: outcome, each stage's state and seconds, the registry decisions, the timing.
    """
    params = load_params(params_path, overrides)
    runner_flow = retrain_flow.with_options(task_runner=_task_runner(params))
    return runner_flow(params_path=str(params_path), overrides=list(overrides or []), force=force)


def watch_and_trigger(root: Path, trigger: Any, *, interval: float, stop: threading.Event) -> threading.Thread:
    """Start a daemon thread that calls ``trigger()`` when the sources change (:func:`components.pipeline.watch_sources`)."""
    from components.pipeline import watch_sources

    thread = threading.Thread(target=watch_sources, args=(root, trigger), kwargs={"interval": interval, "stop": stop}, daemon=True, name="visionflow-watch")
    thread.start()
    return thread


def build_deployment(params_path: str | Path, overrides: list[str] | None, *, cron: str | None, name: str = DEFAULT_DEPLOYMENT) -> Any:
    """The retrain flow as a deployment, with a cron schedule when ``cron`` is given (what ``serve`` serves)."""
    from prefect.schedules import Cron

    from components.errors import ConfigError

    params = load_params(params_path, overrides)
    schedule = None
    if cron:
        try:
            schedule = Cron(cron, timezone="UTC")
        except ValueError as err:
            raise ConfigError(f"invalid cron expression {cron!r}: {err}", record="--cron", fix='use five fields, e.g. "0 3 * * 1"') from None
    runner_flow = retrain_flow.with_options(task_runner=_task_runner(params))
    return runner_flow.to_deployment(
        name=name,
        schedule=schedule,
        parameters={"params_path": str(params_path), "overrides": list(overrides or []), "force": False},
        description="visionflow retraining: the stages of dvc.yaml as processes, recorded in dvc.lock, champion gate",
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


def serve_pipeline(
    params_path: str | Path, overrides: list[str] | None, *, cron: str | None, name: str = DEFAULT_DEPLOYMENT, watch: bool = False, interval: float = 30.0
) -> None:
    """``visionflow serve``: serve the retrain flow on a schedule and/or on new data (blocks until interrupted).

    With ``watch``, a thread polls ``dvc status`` of the source stages every ``interval`` seconds
    and starts a run of the deployment when the sources changed (new, removed or edited files).
    """
    from prefect import serve
    from prefect.deployments import run_deployment

    from components.errors import ConfigError

    if not cron and not watch:
        raise ConfigError("nothing would start a run", record="serve", fix='give --cron "0 3 * * 1", --watch, or both')
    deployment = build_deployment(params_path, overrides, cron=cron, name=name)
    if watch:
        def trigger(changes: list[str]) -> None:
            print("sources changed, starting a retrain run:", *changes, sep="\n  ")
            run_deployment(f"{retrain_flow.name}/{name}", timeout=0)

        watch_and_trigger(Path.cwd(), trigger, interval=interval, stop=threading.Event())
    serve(deployment)
