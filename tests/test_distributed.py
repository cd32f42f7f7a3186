"""DDP under torchrun: 2 gloo processes on this CPU give the single-process result of the same global batch.

The test launches this file as the worker (``launch_torchrun(2, [__file__, ...])``). Each rank joins the
gloo group (:func:`components.distributed.init_distributed`) and trains the same tiny conv net with the
engine: batch 8 per rank from the ``DistributedSampler`` shard, gradients averaged by DDP. The reference
is one process, batch 16, over :func:`components.distributed.build_sampler`'s unsharded permutation (the
same ``seed + epoch`` order), so step ``k`` of both runs sees the same 16 images.

Tolerance: the all-reduce sums two half-batch means in another order than one 16-image mean, so
weights agree to float32 rounding, not bit for bit: ``atol=1e-5, rtol=1e-4`` after 12 AdamW steps
(measured: max |diff| 1.0e-7). The model has no BatchNorm (per-rank batch statistics would
differ by design without SyncBatchNorm) and no dropout, and the data has no random augmentation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # a torchrun worker: make `components` importable without installing
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from components.config import TrainConfig  # noqa: E402
from components.distributed import (  # noqa: E402
    TorchrunEnv,
    build_sampler,
    distributed_session,
    launch_torchrun,
    main_process_first,
    rank,
    run_on_main,
    should_launch,
    torchrun_command,
    world_size,
)
from components.engine import build_loader, fit, load_checkpoint  # noqa: E402
from components.errors import ConfigError, TrainingError  # noqa: E402

GLOBAL_BATCH = 16
NPROCS = 2
EPOCHS = 3
META = {"task": "classification", "model_name": "ddp-probe", "model_args": {}, "categories": ["dark", "bright"]}


class Stripes(Dataset):
    """64 deterministic 8x8 images: horizontal vs vertical stripes, label 0/1 (no random augmentation)."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(3)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        base = torch.zeros(n, 1, 8, 8)
        base[self.labels == 0, :, ::2, :] = 1.0
        base[self.labels == 1, :, :, ::2] = 1.0
        self.images = base + 0.3 * torch.randn(n, 1, 8, 8, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 2))


def step(model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
    images, labels = batch
    return {"loss": nn.functional.cross_entropy(model(images.to(device)), labels.to(device))}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> dict[str, float]:
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images.to(device)).argmax(1) == labels.to(device)).sum())
        total += len(labels)
    return {"accuracy": correct / total}


def train_cfg(batch_size: int) -> TrainConfig:
    return TrainConfig(epochs=EPOCHS, batch_size=batch_size, lr=3e-2, device="cpu", seed=0, threads=1, optimizer="adamw")


def train(out: Path, *, batch_size: int, distributed: bool) -> dict:
    """One run; inside torchrun the engine shards the data, else the unsharded permutation of the same sampler."""
    cfg = train_cfg(batch_size)
    data = Stripes()
    if distributed:
        loader = build_loader(data, cfg, train=True)  # DistributedSampler, batch_size per rank
    else:
        loader = DataLoader(data, batch_size=batch_size, sampler=build_sampler(data, seed=cfg.seed))
    logged: list[int] = []
    result = fit(
        build_model(), train_loader=loader, val_loader=DataLoader(data, batch_size=32), step=step, evaluate=evaluate,
        cfg=cfg, out_dir=out, meta=META, log_metrics=lambda metrics, epoch: logged.append(epoch),
    )
    return {"rank": rank(), "world_size": world_size(), "logged_epochs": logged, "metrics": result.metrics, "steps": result.global_step,
            "sampler": type(loader.sampler).__name__}


def _worker(argv: list[str]) -> None:
    """torchrun entry: ``worker OUT``; each rank writes OUT/rank<r>.json with what it saw and did."""
    out = Path(argv[1])
    with distributed_session("cpu") as joined:
        assert joined and world_size() == NPROCS
        # the MLflow-run pattern: rank 0 opens the run, every rank receives its id (one run, not two)
        run_id = run_on_main(lambda: f"run-opened-by-rank-{rank()}")
        # rank 0 prepares a shared cache first; the others find it complete when they enter
        cache = out / "cache.txt"
        with main_process_first():
            if rank() == 0:
                cache.write_text("decoded once")
            assert cache.read_text() == "decoded once"
        report = train(out / "ddp", batch_size=GLOBAL_BATCH // NPROCS, distributed=True)
        report["run_id"] = run_id
        (out / f"rank{rank()}.json").write_text(json.dumps(report))


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    launch_torchrun(NPROCS, [__file__, "worker", str(tmp_path)], cwd=REPO, env={"TQDM_DISABLE": "1"}, timeout=300, capture=True)
    reference = train(tmp_path / "single", batch_size=GLOBAL_BATCH, distributed=False)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(NPROCS)]
    assert [r["world_size"] for r in ranks] == [NPROCS] * NPROCS
    assert all(r["sampler"] == "DistributedSampler" for r in ranks)
    assert {r["run_id"] for r in ranks} == {"run-opened-by-rank-0"}
    # only rank 0 logs (one MLflow run's worth of metrics); the others log nothing
    assert ranks[0]["logged_epochs"] == list(range(1, EPOCHS + 1)) and ranks[1]["logged_epochs"] == []
    # same number of optimiser steps as the single process of the global batch: the data was sharded
    assert ranks[0]["steps"] == ranks[1]["steps"] == reference["steps"] == EPOCHS * len(Stripes()) // GLOBAL_BATCH
    # rank 0 evaluated and broadcast its metrics; they equal the single-process run's
    assert ranks[1]["metrics"] == ranks[0]["metrics"]
    assert ranks[0]["metrics"]["accuracy"] == pytest.approx(reference["metrics"]["accuracy"])

    # exactly one checkpoint pair, written once, and no temp files of a second writer
    written = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert written == ["best.pt", "last.pt"]
    ddp, single = load_checkpoint(tmp_path / "ddp" / "last.pt"), load_checkpoint(tmp_path / "single" / "last.pt")
    assert isinstance(ddp["rng"], list) and len(ddp["rng"]) == NPROCS  # every rank's RNG state, for resume
    assert ddp["state_dict"].keys() == single["state_dict"].keys()  # unwrapped (no "module." prefix)
    for name, tensor in single["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    moved = (single["state_dict"]["4.weight"] - build_model().state_dict()["4.weight"]).abs().max()
    assert moved > 1e-2  # the comparison is not between two untrained models


@pytest.mark.slow  # another torchrun start-up (~10 s on a shared CPU) for an error path
def test_a_failing_rank_is_a_training_error(tmp_path):
    bad = tmp_path / "fail.py"
    bad.write_text("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    with pytest.raises(TrainingError) as err:
        launch_torchrun(NPROCS, [str(bad)], timeout=120, capture=True)
    assert "exit code" in str(err.value)


def test_launch_decision_command_and_environment():
    assert should_launch(train_cfg(8).model_copy(update={"nprocs": 2}), environ={})
    assert not should_launch(train_cfg(8).model_copy(update={"nprocs": 2}), environ={"WORLD_SIZE": "2"})  # already a worker
    assert not should_launch(train_cfg(8), environ={})
    cmd = torchrun_command(2, ["-m", "flows.cli", "pretrain"], master_port=29511)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[cmd.index("--master_port") + 1] == "29511"
    assert cmd[-3:] == ["-m", "flows.cli", "pretrain"]
    with pytest.raises(ConfigError):
        torchrun_command(0, ["x.py"])
    assert TorchrunEnv.from_environ({}) is None
    env = TorchrunEnv.from_environ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "7"})
    assert (env.rank, env.local_rank, env.world_size, env.master_port) == (1, 1, 2, 7)
    with pytest.raises(ConfigError):
        TorchrunEnv.from_environ({"RANK": "2", "WORLD_SIZE": "2"})


def test_build_sampler_shards_partition_the_single_process_order():
    data = Stripes()
    whole = list(build_sampler(data, seed=5))
    shards = [list(build_sampler(data, seed=5, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(whole) == list(range(len(data)))
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]  # round-robin over one permutation
    # step k of 2 ranks x batch 8 covers positions [16k, 16k+16) of the single-process order
    assert sorted(shards[0][:8] + shards[1][:8]) == sorted(whole[:16])


if __name__ == "__main__":
    _worker(sys.argv[1:])
