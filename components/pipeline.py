"""The pipeline as DVC declares it: the stage table of ``dvc.yaml``, what is stale, one stage run, ``dvc.lock``.

``dvc.yaml`` is the only declaration of the stages. :func:`load_stages` reads the resolved stages
(``foreach`` expanded, ``${...}`` filled from ``params.yaml``) and their dependency graph through
DVC's Python API; :func:`run_stage_command` runs one stage's ``cmd`` as a child process, the argv
``dvc repro`` would run, in the same working directory; :func:`commit_stage` then records the stage
in ``dvc.lock`` (``dvc commit``) so that ``dvc status`` agrees with what ran. The Prefect flow
(``flows/retrain.py``) only wires these together: which stages, in which order, two at a time, with
retries, artifacts and the MLflow parent run. Nothing here imports Prefect or MLflow.

DVC's repository lock is held by every status and commit call; a process-wide lock and a file lock
(``.dvc/tmp/visionflow-repo.lock``) serialise them between the flow's threads and between the
processes of a Dask cluster that share the workspace, and a ``dvc repro`` in another process makes
them wait or fail cleanly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.errors import ConfigError, VisionflowError

#: training stages accept ``--resume``: a retry continues from the stage's ``last.pt``
RESUMABLE_COMMANDS = ("visionflow pretrain", "visionflow finetune", "visionflow detect --arch", "visionflow segment --arch")
#: environment variables that carry the run context to a stage process (read by ``flows/cli.py``)
FLOW_RUN_ENV = "VISIONFLOW_FLOW_RUN_ID"
PARENT_RUN_ENV = "VISIONFLOW_PARENT_RUN_ID"

_DVC_LOCK = threading.Lock()


class StageFailed(VisionflowError):
    """A stage's command exited non-zero (its last output lines are in the message).

    ``transient``: the exit code was :data:`components.errors.TRANSIENT_EXIT_CODE`, a failure a retry may cure.
    """

    transient = False


@dataclass(frozen=True)
class Stage:
    """One resolved stage of ``dvc.yaml``."""

    name: str  # DVC's addressing: ``detect@yolo``
    cmd: str
    upstream: tuple[str, ...]  # stages whose outputs this one depends on
    metrics: tuple[str, ...] = ()  # its metrics files (a skipped stage says why in them)

    @property
    def resumable(self) -> bool:
        return self.cmd.startswith(RESUMABLE_COMMANDS)


@dataclass
class StageRun:
    """What one execution of a stage command did."""

    name: str
    returncode: int
    seconds: float
    started: float  # perf_counter at start (the flow's overhead is wall time minus the union of stage spans)
    tail: list[str] = field(default_factory=list)  # the last output lines


def _workspace_lock(root: Path) -> AbstractContextManager[Any]:
    """A file lock in ``.dvc/tmp`` on which the stage tasks of other processes sharing the workspace (Dask workers) wait."""
    from filelock import FileLock

    tmp = root / ".dvc" / "tmp"
    if not tmp.parent.is_dir():
        return nullcontext()  # not a DVC project: Repo() says so
    tmp.mkdir(exist_ok=True)
    return FileLock(tmp / "visionflow-repo.lock")


@contextmanager
def open_repo(root: Path) -> Iterator[Any]:
    """The DVC repository at ``root``, under the process-wide lock."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    with _DVC_LOCK, _workspace_lock(root):
        try:
            repo = Repo(str(root))
        except DvcException as err:
            raise ConfigError(f"not a DVC project: {err}", file=root, fix="run from the repository root (dvc init once)") from None
        with repo:
            yield repo


def load_stages(root: Path) -> list[Stage]:
    """Every stage of ``dvc.yaml`` in a topological order (upstream first).

    Raises:
        ConfigError: ``dvc.yaml`` or ``params.yaml`` cannot be resolved (DVC's message names the key).
    """
    import networkx as nx
    from dvc.exceptions import DvcException

    with open_repo(root) as repo:
        try:
            graph = repo.index.graph  # edges: stage -> the stages it depends on
        except DvcException as err:
            raise ConfigError(f"cannot resolve the stage table: {err}", file=root / "dvc.yaml", fix="check dvc.yaml against params.yaml") from None
        # upstream first; among stages ready together, the shallower first (every ingest before any
        # training), so that a short stage on the critical path never waits behind long siblings
        depth: dict[Any, int] = {}
        for stage in reversed(list(nx.topological_sort(graph))):
            depth[stage] = 1 + max((depth[s] for s in graph.successors(stage)), default=-1)
        order = sorted(depth, key=lambda s: (depth[s], s.name))
        out = []
        for stage in order:
            if not getattr(stage, "cmd", None):
                continue  # a .dvc file (tracked data), not a pipeline stage
            cmd = stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)
            upstream = tuple(sorted(s.name for s in graph.successors(stage) if getattr(s, "cmd", None)))
            metrics = tuple(str(o.def_path) for o in stage.outs if o.metric)
            out.append(Stage(stage.name, cmd, upstream, metrics))
    return out


def stale_stages(root: Path, names: list[str] | None = None) -> dict[str, list[Any]]:
    """``dvc status`` of ``names`` (all stages when None): ``{stage: [what changed]}``, empty when up to date."""
    with open_repo(root) as repo:
        stale = repo.status(targets=[_target(root, n) for n in names] if names else None)
    return {name.rpartition(":")[2]: changes for name, changes in stale.items()}


def _target(root: Path, name: str) -> str:
    """DVC's address of a stage of ``root/dvc.yaml`` whatever the working directory."""
    return f"{root.resolve() / 'dvc.yaml'}:{name}"


def is_up_to_date(root: Path, name: str) -> bool:
    """True when DVC finds nothing changed in the stage: its deps, params, cmd and outs match ``dvc.lock``."""
    return not stale_stages(root, [name])


def commit_stage(root: Path, name: str) -> None:
    """Record ``name``'s deps, params and outputs in ``dvc.lock`` (``dvc commit -f name``), outputs into the cache.

    Raises:
        StageFailed: the stage exited 0 but did not write an output ``dvc.yaml`` declares.
    """
    from dvc.exceptions import DvcException

    with open_repo(root) as repo:
        try:
            repo.commit(_target(root, name), force=True)
        except DvcException as err:
            raise StageFailed(
                f"stage {name} finished but cannot be recorded in dvc.lock: {err}", file=root / "dvc.yaml", record=name,
                fix="the stage's command must write every output dvc.yaml declares for it",
            ) from None


def stage_command(stage: Stage, *, resume: bool = False) -> str:
    """The shell command of a stage; a retry of a training stage continues from its ``last.pt``."""
    return f"{stage.cmd} --resume" if resume and stage.resumable else stage.cmd


def stage_environment(*, flow_run_id: str | None = None, parent_run_id: str | None = None) -> dict[str, str]:
    """This process's environment for a stage process: ``visionflow`` on PATH, unbuffered output, the run context."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):  # after the caller's PATH: an activated env wins
        env["PATH"] = env.get("PATH", "") + os.pathsep + bindir
    env["PYTHONUNBUFFERED"] = "1"
    if flow_run_id:
        env[FLOW_RUN_ENV] = flow_run_id
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    return env


def run_stage_command(
    name: str, command: str, *, root: Path, env: dict[str, str] | None = None, log: Callable[[str], None] = print, tail_lines: int = 20
) -> StageRun:
    """Run one stage command as a child process (as ``dvc repro`` would: a shell, the project root), streaming its output.

    Every output line goes to ``log`` prefixed with the stage name; the last ``tail_lines`` are kept
    for the error message of a failure.
    """
    start = time.perf_counter()
    tail: list[str] = []
    proc = subprocess.Popen(
        command, shell=True, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace"
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\r\n").rsplit("\r", 1)[-1]  # a carriage-return progress line: keep its final state
        if not line.strip():
            continue
        log(f"[{name}] {line}")
        tail = (tail + [line])[-tail_lines:]
    returncode = proc.wait()
    return StageRun(name, returncode, time.perf_counter() - start, start, tail)


def check_stage_run(run: StageRun, command: str) -> None:
    """Raise :class:`StageFailed` naming the stage, its command and its last lines when it exited non-zero."""
    from components.errors import TRANSIENT_EXIT_CODE

    if run.returncode != 0:
        last = " | ".join(run.tail[-5:])
        err = StageFailed(
            f"stage {run.name} failed (exit {run.returncode}): {last}",
            record=run.name,
            fix=f"run `{command}` to see the whole output; `visionflow run` retries transient failures",
        )
        err.transient = run.returncode == TRANSIENT_EXIT_CODE
        raise err


def skip_reason(root: Path, stage: Stage) -> str | None:
    """Why a stage that ran did nothing (its metrics file says ``status: skipped``), or None."""
    import json

    for rel in stage.metrics:
        path = root / rel
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and str(data.get("status", "")).lower() == "skipped":
            return str(data.get("reason") or "skipped")
    return None


def write_effective_params(source: Path, overrides: list[str], dest: Path) -> bool:
    """Make ``dest`` (the project's ``params.yaml``) hold ``source`` with ``overrides`` applied, as ``dvc exp run -S`` does.

    The pipeline's parameters are ``params.yaml``: DVC reads them (``dvc.yaml`` interpolates them), so
    ``--params FILE`` and ``--set`` are written there before a run, validated first. ``--set`` on
    ``params.yaml`` itself edits the keys in place (comments kept); another ``FILE`` (e.g. one of
    ``configs/``, which may give only some sections) is written whole, every default filled in. A
    previous ``params.yaml`` that differs is kept as ``params.yaml.bak``. Returns True when ``dest`` changed.
    """
    from components.config import load_params
    from components.io import atomic_write_text

    params = load_params(source, overrides)  # validate before touching anything
    same_file = dest.exists() and source.resolve() == dest.resolve()
    if same_file and not overrides:
        return False
    text = _edited_in_place(dest, overrides) if same_file else _full_params_text(params, source)
    if dest.exists() and yaml.safe_load(dest.read_text()) == yaml.safe_load(text):
        return False
    if dest.exists():
        dest.with_name(dest.name + ".bak").write_text(dest.read_text())
    atomic_write_text(dest, text)
    return True


def _edited_in_place(path: Path, overrides: list[str]) -> str:
    """``path``'s YAML with each ``key.path=value`` set, comments and order kept (ruamel round trip)."""
    import io

    from ruamel.yaml import YAML

    from components.config import parse_override

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a line the user wrote
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    tree = rt.load(path.read_text())
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    buffer = io.StringIO()
    rt.dump(tree, buffer)
    return buffer.getvalue()


def _full_params_text(params: Any, source: Path) -> str:
    """Every section of ``params`` (defaults filled in: ``dvc.yaml`` interpolates keys a short config omits)."""
    tree = params.model_dump(mode="json")
    for section in ("detect", "segment"):
        tree[section].pop("dataset", None)  # derived from data.out, not a key of the file
    header = f"# written by `visionflow run --params {source}`: that file with every default filled in\n"
    return header + yaml.safe_dump(tree, sort_keys=False)


def describe_changes(stale: dict[str, list[Any]]) -> list[str]:
    """One line per stale stage: what DVC found changed (deps, params, outs, missing lock entry)."""
    lines = []
    for name, changes in stale.items():
        parts = []
        for change in changes:
            if isinstance(change, dict):
                for kind, what in change.items():
                    parts.append(f"{kind}: {', '.join(f'{k} {v}' for k, v in what.items()) if isinstance(what, dict) else what}")
            else:
                parts.append(str(change))
        lines.append(f"{name}: {'; '.join(parts)}")
    return lines


def lock_drift(root: Path) -> list[str]:
    """Stages whose ``dvc.lock`` entry does not match the checkout's code, params or command.

    What a developer runs before resolving an issue (``python scripts/check_lock.py``): the
    committed lock and metrics must come from the committed code and params. Missing outputs (a
    fresh clone has none) are not drift; changed deps, params and commands are.
    """
    stale = stale_stages(root)
    drift = {}
    for name, changes in stale.items():
        kept = [c for c in changes if not (isinstance(c, dict) and set(c) <= {"changed outs"})]
        kept = [c for c in kept if not (isinstance(c, dict) and "changed deps" in c and _only_missing_outputs_of_others(c["changed deps"]))]
        if kept:
            drift[name] = kept
    return describe_changes(drift)


def _only_missing_outputs_of_others(deps: Any) -> bool:
    return isinstance(deps, dict) and all(v in ("deleted", "not in cache") for v in deps.values())




def source_stages(stages: list[Stage]) -> list[str]:
    """The stages that read from outside the pipeline (no upstream stage): the ingests of the sources."""
    return [s.name for s in stages if not s.upstream]


def watch_sources(
    root: Path, trigger: Callable[[list[str]], Any], *, interval: float = 30.0, stop: threading.Event | None = None, names: list[str] | None = None
) -> None:
    """Poll ``dvc status`` of the source stages every ``interval`` seconds; call ``trigger(changes)`` once per new change.

    A change is a new set of differences between the sources and ``dvc.lock`` (an image added,
    removed or edited under ``data.path``): it triggers once, and again only when the differences
    change (more files arrive) or after the pipeline has caught up. Polls that find the
    repository locked (a run committing) are skipped.
    """
    import json

    from dvc.exceptions import DvcException

    stop = stop or threading.Event()
    names = names or source_stages(load_stages(root))
    last: str | None = None
    while not stop.is_set():
        try:
            stale = stale_stages(root, names)
        except DvcException:
            stale = None  # locked by a run that is committing: look again next time
        if stale is not None:
            signature = json.dumps(stale, sort_keys=True, default=str) if stale else None
            if signature and signature != last:
                trigger(describe_changes(stale))
            last = signature
        stop.wait(interval)
