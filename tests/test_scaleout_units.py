"""The scale-out decisions as pure functions, checked on a CPU: CUDA precision and layout, node topology, task runner.

No GPU, cluster or second machine is needed: the CUDA branches take the device and its capability as
arguments (a fake ``cuda`` device, ``bf16_supported``), the multi-node launcher's options come from a
config and an environment dict, and the Dask task runner is built, not started.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from components.config import TrainConfig, load_params
from components.distributed import NodeTopology, default_backend, should_launch, torchrun_command
from components.engine import TrainingState, build_optimizer, build_scheduler, train_one_epoch
from components.errors import ConfigError
from components.training.runtime import amp_dtype, needs_grad_scaler, prefers_channels_last

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)  # a device object only: nothing is allocated on it
CPU = torch.device("cpu")


def test_amp_uses_bfloat16_where_the_gpu_has_it_else_float16_with_a_grad_scaler():
    assert amp_dtype(CUDA, bf16_supported=True) is torch.bfloat16  # Ampere and newer (A100, H100)
    assert amp_dtype(CUDA, bf16_supported=False) is torch.float16  # V100, T4
    assert needs_grad_scaler(torch.float16) and not needs_grad_scaler(torch.bfloat16)
    assert amp_dtype(CPU) is torch.bfloat16  # never asks CUDA on a CPU-only machine
    assert default_backend(CUDA) == "nccl" and default_backend(CPU) == "gloo"


def test_channels_last_only_for_convnets_under_cuda_mixed_precision():
    convnet = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten())
    mlp = nn.Sequential(nn.Linear(4, 4))
    assert prefers_channels_last(convnet, CUDA, amp=True)
    assert not prefers_channels_last(convnet, CUDA, amp=False)
    assert not prefers_channels_last(convnet, CPU, amp=True)
    assert not prefers_channels_last(mlp, CUDA, amp=True)


def test_the_epoch_runs_its_step_under_the_chosen_autocast_dtype(tmp_path):
    """The dtype reaches ``torch.autocast`` (on a CPU, bfloat16 autocast exists, so the wiring is checked here)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    cfg = TrainConfig(epochs=1, batch_size=4, device="cpu", optimizer="sgd", lr=0.1)
    seen: list[torch.dtype] = []

    def step(m: nn.Module, batch: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        out = m(batch)
        seen.append(out.dtype)
        return {"loss": out.float().pow(2).mean()}

    optimizer = build_optimizer(model, cfg)
    state = TrainingState(
        model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg, steps_per_epoch=2),
        scaler=torch.amp.GradScaler("cuda", enabled=False), cfg=cfg, steps_per_epoch=2, meta={}, generator=None,
    )
    batches = [torch.randn(4, 4) for _ in range(2)]
    stats = train_one_epoch(model, step, state, batches, CPU, 0, use_amp=True, out_dir=tmp_path, stage="amp", dtype=torch.bfloat16)
    assert seen == [torch.bfloat16, torch.bfloat16] and stats.steps == 2 and state.global_step == 2


def test_multi_node_topology_from_params_and_the_schedulers_environment():
    cfg = TrainConfig(nprocs=2, nnodes=2, rdzv_endpoint="10.0.0.5:29400")
    argv = ["detect", "--arch", "yolo"]
    node0 = NodeTopology.from_config(cfg, argv, environ={})  # no NODE_RANK: the launching node is 0
    node1 = NodeTopology.from_config(cfg, [*argv, "--resume"], environ={"NODE_RANK": "1"})
    assert (node0.node_rank, node1.node_rank) == (0, 1)
    assert node0.rdzv_id == node1.rdzv_id  # the same job on both machines (a retry's --resume included)
    assert NodeTopology.from_config(cfg, argv, environ={"JOB_COMPLETION_INDEX": "1"}).node_rank == 1  # Kubernetes indexed Job
    assert NodeTopology.from_config(cfg, argv, environ={"VISIONFLOW_RDZV_ID": "job-7"}).rdzv_id == "job-7"
    assert NodeTopology.from_config(TrainConfig(nprocs=2), argv, environ={}) is None  # one machine
    with pytest.raises(ConfigError, match="NODE_RANK"):
        NodeTopology.from_config(cfg, argv, environ={"NODE_RANK": "2"})

    cmd = torchrun_command(2, ["-m", "flows.cli", *argv], nodes=node1)
    opts = dict(zip(cmd[3:-5:2], cmd[4:-5:2], strict=True))
    assert opts == {"--nnodes": "2", "--rdzv-backend": "c10d", "--rdzv-endpoint": "10.0.0.5:29400", "--rdzv-id": node1.rdzv_id,
                    "--rdzv-conf": "is_host=false", "--nproc-per-node": "2"}
    assert "is_host=true" in torchrun_command(1, ["x.py"], nodes=node0)  # node 0 hosts the rendezvous store
    assert should_launch(TrainConfig(nnodes=2, rdzv_endpoint="h:1"), environ={})  # one process per node still launches torchrun


def test_multi_node_params_are_validated_with_the_key_named(tmp_path):
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        load_params(REPO / "params.yaml", ["pretrain.train.nnodes=2"])
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_params(REPO / "params.yaml", ["detect.yolo.train.nnodes=2", "detect.yolo.train.rdzv_endpoint=nohost"])
    ok = load_params(REPO / "params.yaml", ["detect.yolo.train.nnodes=2", "detect.yolo.train.rdzv_endpoint=node0:29400"])
    assert ok.detect.yolo.train.nnodes == 2


def test_the_dask_task_runner_from_params():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.retrain import _task_runner

    local = _task_runner(load_params(REPO / "params.yaml", ["orchestration.task_runner=dask", "orchestration.max_workers=3"]))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["processes"] is True  # worker processes, not threads
    remote = _task_runner(load_params(REPO / "params.yaml", ["orchestration.task_runner=dask", "orchestration.address=tcp://10.0.0.5:8786"]))
    assert remote.address == "tcp://10.0.0.5:8786"
    threads = _task_runner(load_params(REPO / "params.yaml"))
    assert isinstance(threads, ThreadPoolTaskRunner)
