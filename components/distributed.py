"""Data-parallel training across processes: torchrun's environment, process groups, samplers, the launcher.

The engine (:mod:`components.engine`) already trains under DistributedDataParallel whenever a
process group exists: its ``build_loader`` gives every rank a disjoint shard through a
``DistributedSampler``, DDP averages the gradients (all-reduce after each backward), and only
rank 0 evaluates, logs and writes ``best.pt``/``last.pt`` while the others wait at barriers.
This module supplies what happens around it:

* :func:`launch_torchrun` starts ``nprocs`` copies of a command under ``torchrun``
  (``python -m torch.distributed.run``) on this machine: what a Prefect task does for a stage
  whose ``train.nprocs > 1``; with ``train.nnodes > 1`` it starts this machine's share of a job
  across machines (:class:`NodeTopology`: every node runs the same command, they meet at the c10d
  rendezvous ``train.rdzv_endpoint``, the node rank comes from ``$NODE_RANK``);
* :func:`init_distributed` joins the process group torchrun describes in the environment
  (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), with gloo on CPU
  and nccl on CUDA (one GPU per local rank);
* :func:`run_on_main` / :func:`main_process_first`: rank-0-only work (an MLflow run, a registry
  write, a download) whose result the other ranks receive, instead of repeating it;
* :func:`build_sampler`: the same shard order outside torchrun (``num_replicas=1``), so a
  single-process run can reproduce a distributed one with the same *global* batch: with
  ``W`` ranks of batch ``B``, optimiser step ``k`` sees positions ``[kWB, (k+1)WB)`` of the
  epoch's permutation, exactly what one process of batch ``W*B`` over the same sampler sees.

Rank queries (``rank``, ``world_size``, ``is_main_process``, ``barrier``) live in the engine and are
re-exported here.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from components.config import TrainConfig
from components.engine import barrier, is_distributed, is_main_process, rank, resolve_device, world_size
from components.errors import ConfigError, TrainingError

__all__ = [
    "NODE_RANK_ENV",
    "NodeTopology",
    "TorchrunEnv",
    "barrier",
    "build_sampler",
    "default_backend",
    "distributed_session",
    "find_free_port",
    "in_torchrun_worker",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "launch_torchrun",
    "main_process_first",
    "rank",
    "run_on_main",
    "should_launch",
    "shutdown_distributed",
    "torchrun_command",
    "world_size",
]

T = TypeVar("T")
_current_rank = rank  # build_sampler's ``rank`` argument shadows the function

#: a rank that waits longer than this at a collective (another rank crashed or hangs) fails instead of hanging
DEFAULT_TIMEOUT = timedelta(minutes=10)
#: the node rank a scheduler gives each machine of a multi-node job (a Kubernetes indexed Job's index otherwise)
NODE_RANK_ENV = "NODE_RANK"
K8S_INDEX_ENV = "JOB_COMPLETION_INDEX"
#: the rendezvous id of a multi-node job, when the scheduler names the job (else derived from the stage command)
RDZV_ID_ENV = "VISIONFLOW_RDZV_ID"


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun tells each worker through its environment.

    Attributes:
        rank: global rank, 0..world_size-1.
        local_rank: rank on this machine (selects the GPU under nccl).
        world_size: number of processes in the job.
        master_addr, master_port: the rendezvous of rank 0's TCP store.
    """

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
        """Parse torchrun's variables; None outside torchrun (``WORLD_SIZE`` unset).

        Raises:
            ConfigError: a variable is set but is not an integer, or the ranks are inconsistent.
        """
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return None
        try:
            parsed = cls(
                rank=int(env.get("RANK", "0")),
                local_rank=int(env.get("LOCAL_RANK", "0")),
                world_size=int(env["WORLD_SIZE"]),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", "29500")),
            )
        except ValueError as err:
            raise ConfigError(f"torchrun environment is malformed: {err}", record="RANK/LOCAL_RANK/WORLD_SIZE/MASTER_PORT",
                              fix="launch with torchrun (components.distributed.launch_torchrun)") from None
        if not 0 <= parsed.rank < parsed.world_size or parsed.local_rank < 0:
            raise ConfigError(f"RANK {parsed.rank} is outside WORLD_SIZE {parsed.world_size}", record="RANK",
                              fix="launch with torchrun (components.distributed.launch_torchrun)")
        return parsed


def default_backend(device: torch.device) -> str:
    """nccl for CUDA tensors, gloo for CPU ones (gloo also runs on a CPU-only build)."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: str = "auto", *, timeout: timedelta = DEFAULT_TIMEOUT) -> bool:
    """Join torchrun's process group when there is one; a no-op in a plain single process.

    Call it once at the start of a worker, before building loaders (``build_loader`` picks the
    ``DistributedSampler`` only inside a group) and before :func:`components.engine.fit`.

    Args:
        device: the stage's ``train.device``: ``auto``/``cuda`` with CUDA selects nccl and binds
            this process to ``cuda:LOCAL_RANK``; ``cpu`` (or no CUDA) selects gloo.
        timeout: how long a collective may wait for a missing rank before failing.

    Returns:
        True when this process is part of a group of more than one process.

    Raises:
        ConfigError: malformed torchrun variables, or more local ranks than visible GPUs under nccl.
    """
    env = TorchrunEnv.from_environ()
    if env is None or env.world_size < 2:
        return False
    if is_distributed():
        return True
    target = resolve_device(device)
    if target.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} CUDA device(s)",
                record="train.nprocs",
                fix="set train.nprocs to at most the number of GPUs, or train.device: cpu",
            )
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend=default_backend(target),
        init_method="env://",  # under torchrun: the agent's rendezvous store (MASTER_ADDR/MASTER_PORT)
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    return True


def shutdown_distributed() -> None:
    """Leave the process group (after a final barrier, so no rank exits while others still talk)."""
    if is_distributed():
        barrier()
        dist.destroy_process_group()


@contextmanager
def distributed_session(device: str = "auto") -> Iterator[bool]:
    """``with distributed_session(cfg.device) as ddp:`` joins the group (if any) and always leaves it."""
    joined = init_distributed(device)
    try:
        yield joined
    finally:
        if joined:
            if sys.exc_info()[0] is None:
                shutdown_distributed()
            elif is_distributed():  # a failing rank must not wait at a barrier the others never reach
                dist.destroy_process_group()


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give every rank its (picklable) result.

    E.g. rank 0 opens the MLflow run and the others receive its id, so that one run is logged,
    not ``world_size`` of them. Outside a group ``fn`` simply runs.

    Raises:
        TrainingError: ``fn`` failed on rank 0 (the other ranks raise it too, rather than hang).
    """
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    if is_main_process():
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - forwarded to every rank below, re-raised on rank 0
            box[0] = ("error", f"{type(err).__name__}: {err}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise TrainingError(f"rank 0 failed: {value}", record=f"rank {rank()}", fix="see rank 0's error above")
    return value


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. decodes or caches a dataset), then the others run it from the cache."""
    if is_distributed() and not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_distributed() and is_main_process():
            barrier()


def build_sampler(
    dataset: Dataset,
    *,
    seed: int,
    shuffle: bool = True,
    num_replicas: int | None = None,
    rank: int | None = None,
    drop_last: bool = False,
) -> DistributedSampler:
    """The engine's sharded order: a permutation seeded by ``seed + epoch``, dealt round-robin to the ranks.

    Inside a group ``num_replicas``/``rank`` default to the group's; outside they default to 1/0,
    the whole permutation (the single-process reference of a distributed run). The engine calls
    ``set_epoch`` on it every epoch.

    Args:
        dataset: any map-style dataset of ``N`` items.
        seed: ``train.seed``.
        shuffle: False for evaluation order.
        num_replicas, rank: override the group's (e.g. to reproduce rank 1's shard in a test).
        drop_last: drop the tail that does not divide evenly (else the sampler pads by repeating).
    """
    replicas = num_replicas if num_replicas is not None else world_size()
    index = rank if rank is not None else _current_rank()
    return DistributedSampler(dataset, num_replicas=replicas, rank=index, shuffle=shuffle, seed=seed, drop_last=drop_last)


# --------------------------------------------------------------------------- launching


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous; two jobs never share one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def in_torchrun_worker(environ: Mapping[str, str] | None = None) -> bool:
    """True in a process that torchrun started (``WORLD_SIZE`` is set)."""
    return "WORLD_SIZE" in (os.environ if environ is None else environ)


def should_launch(cfg: TrainConfig, environ: Mapping[str, str] | None = None) -> bool:
    """True when a stage asks for ``train.nprocs > 1`` or ``train.nnodes > 1`` and we are not already a torchrun worker."""
    return (cfg.nprocs > 1 or cfg.nnodes > 1) and not in_torchrun_worker(environ)


@dataclass(frozen=True)
class NodeTopology:
    """Where this machine stands in a torchrun job across ``nnodes`` machines (c10d rendezvous).

    Every node runs the same stage command with the same ``train.nnodes`` and
    ``train.rdzv_endpoint``; torchrun's agents meet at the endpoint, a TCP store that node 0
    hosts (``--rdzv-conf is_host=true`` there, ``false`` elsewhere, so a node never mistakes
    itself for the host), and the job starts once all ``nnodes`` have joined. Under c10d the
    rendezvous, not ``--node-rank``, orders the nodes' global ranks: which machine's process is
    global rank 0 (it writes the stage's files and its MLflow run) is not fixed, so a multi-node
    stage's working folder is shared storage, the same path on every node (README, "Scale-out").

    Attributes:
        nnodes: machines in the job.
        node_rank: this machine's index, 0..nnodes-1 (0 hosts the rendezvous store).
        rdzv_endpoint: ``HOST:PORT`` of node 0's store.
        rdzv_id: the job's id, the same on every node (two jobs at one endpoint never mix).
    """

    nnodes: int
    node_rank: int
    rdzv_endpoint: str
    rdzv_id: str

    @classmethod
    def from_config(cls, cfg: TrainConfig, argv: Sequence[str], environ: Mapping[str, str] | None = None) -> NodeTopology | None:
        """The topology of a stage with ``train.nnodes > 1`` (None for one machine).

        The node rank is ``$NODE_RANK`` (what a launcher script or the PyTorchJob operator sets),
        else ``$JOB_COMPLETION_INDEX`` (a Kubernetes indexed Job's pod index), else 0: the node
        whose Prefect task launched the stage. The rendezvous id is ``$VISIONFLOW_RDZV_ID``, else
        derived from the stage command (``--resume`` ignored), identical on every node.

        Raises:
            ConfigError: the node rank is not an integer in ``[0, nnodes)``.
        """
        if cfg.nnodes < 2:
            return None
        env = os.environ if environ is None else environ
        source = NODE_RANK_ENV if NODE_RANK_ENV in env else K8S_INDEX_ENV
        raw = env.get(source, "0")
        if not raw.strip().isdigit() or int(raw) >= cfg.nnodes:
            raise ConfigError(
                f"node rank {raw!r} (${source}) is not an integer in [0, {cfg.nnodes})", record=f"${source}",
                fix=f"set {NODE_RANK_ENV}=0 on the machine at train.rdzv_endpoint and 1..{cfg.nnodes - 1} on the others",
            )
        command = " ".join(a for a in argv if a != "--resume")
        rdzv_id = env.get(RDZV_ID_ENV) or "visionflow-" + hashlib.sha1(command.encode()).hexdigest()[:12]
        return cls(cfg.nnodes, int(raw), str(cfg.rdzv_endpoint), rdzv_id)

    def torchrun_options(self) -> list[str]:
        """``--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID --rdzv-conf is_host=...``."""
        return [
            "--nnodes", str(self.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", self.rdzv_endpoint,
            "--rdzv-id", self.rdzv_id, "--rdzv-conf", f"is_host={'true' if self.node_rank == 0 else 'false'}",
        ]


def torchrun_command(
    nprocs: int, argv: Sequence[str], *, master_port: int | None = None, master_addr: str = "127.0.0.1", nodes: NodeTopology | None = None
) -> list[str]:
    """``python -m torch.distributed.run --nproc-per-node N ... ARGV...`` for one machine or one node of several.

    One machine (``nodes`` None): ``--nnodes 1 --master-addr A --master-port P``. Several:
    :meth:`NodeTopology.torchrun_options` (c10d rendezvous; ``master_*`` unused).

    Args:
        nprocs: processes on this machine (one per GPU under nccl; CPU cores / threads under gloo).
        argv: the worker command after torchrun's options: a script and its arguments
            (``["train.py", "--epochs", "3"]``) or a module (``["-m", "flows.cli", "detect", "--arch", "yolo"]``).
        master_port: rendezvous port of a one-machine job (default: a free one, so concurrent jobs do not collide).
        master_addr: its address.
        nodes: this machine's place in a multi-node job.
    """
    if nprocs < 1:
        raise ConfigError(f"nprocs must be >= 1, got {nprocs}", record="train.nprocs", fix="set train.nprocs to 1 or more")
    if not argv:
        raise ConfigError("no worker command to launch", record="argv", fix="pass a script or -m module and its arguments")
    if nodes is not None:
        return [sys.executable, "-m", "torch.distributed.run", *nodes.torchrun_options(), "--nproc-per-node", str(nprocs), *argv]
    port = master_port if master_port is not None else find_free_port(master_addr)
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", str(nprocs),
        "--master_addr", master_addr, "--master_port", str(port),
        *argv,
    ]


def launch_torchrun(
    nprocs: int,
    argv: Sequence[str],
    *,
    master_port: int | None = None,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    threads_per_process: int | None = 1,
    timeout: float | None = None,
    capture: bool = False,
    nodes: NodeTopology | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``nprocs`` processes under torchrun on this machine and wait for all of them.

    This is what a Prefect task does for a stage whose ``train.nprocs > 1`` (e.g.
    ``launch_torchrun(2, ["-m", "flows.cli", "pretrain", "--set", "pretrain.train.nprocs=2"])``):
    the worker is the ordinary stage command, which joins the group through
    :func:`init_distributed` and trains with the engine.

    Args:
        nprocs: number of worker processes.
        argv: worker command after torchrun's options (see :func:`torchrun_command`).
        master_port: rendezvous port (default: a free one).
        cwd, env: working folder and extra environment variables of the workers.
        threads_per_process: ``OMP_NUM_THREADS`` of each worker (None: torchrun's default); on a
            CPU, ``nprocs`` processes times the intra-op threads should not exceed the cores.
        timeout: seconds before the whole job is killed (None: no limit).
        capture: keep stdout/stderr in the result (the tail goes into the error); otherwise they
            stream to this process's output, as a Prefect task's log shows them.
        nodes: this machine's place in a job across machines (None: this machine alone); the
            call returns when the whole job ends, so it waits for the other nodes to join.

    Returns:
        The completed torchrun process (``returncode`` 0).

    Raises:
        TrainingError: a worker failed (torchrun exits non-zero) or the job timed out.
    """
    cmd = torchrun_command(nprocs, argv, master_port=master_port, nodes=nodes)
    child_env = {**os.environ, **(env or {})}
    if threads_per_process is not None:
        child_env["OMP_NUM_THREADS"] = str(threads_per_process)
    try:
        done = subprocess.run(cmd, cwd=cwd, env=child_env, timeout=timeout, text=True, capture_output=capture, check=False)
    except subprocess.TimeoutExpired:
        raise TrainingError(f"torchrun job did not finish in {timeout:g} s", record=" ".join(argv),
                            fix="raise the timeout or check for a hanging rank") from None
    if done.returncode != 0:
        tail = ((done.stdout or "") + (done.stderr or ""))[-2000:] if capture else "see the workers' output above"
        where = f" on node {nodes.node_rank} of {nodes.nnodes} (rendezvous {nodes.rdzv_endpoint})" if nodes else ""
        raise TrainingError(
            f"torchrun with {nprocs} processes{where} failed (exit code {done.returncode}): {tail}",
            record=" ".join(argv),
            fix="the first failing rank's traceback names the cause; re-run with train.nprocs: 1 to debug",
        )
    return done
