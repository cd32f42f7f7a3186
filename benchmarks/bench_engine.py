"""Training throughput of the engine against a plain PyTorch loop: same model, data, batch size, threads.

    .venv/bin/python benchmarks/bench_engine.py [--epochs 3] [--images 1024] [--batch-size 64] [--repeats 3] [--device cuda]

What is compared, in one process, alternating so that a busy shared CPU affects both alike:

* **engine**: :func:`components.engine.fit` as the pretrain stage calls it (``build_loader``,
  ``classification_step``, per-step loss read-back and NaN guard, tqdm progress, per-epoch
  ``log_metrics``, atomic ``best.pt``/``last.pt`` with optimiser and RNG states, LR schedule);
* **plain**: the textbook loop over the same ``DataLoader``: forward, cross-entropy, backward,
  AdamW step, scheduler step; nothing else.

Both train the project's pretrain classifier (``classifier`` on ``convnet_small``) on in-memory 32x32
images with the ``basic`` classification augmentation applied on the fly, so augmentation costs the
same in both and the difference is the engine's own work. No validation (it would be the same
evaluation code in both). Overhead = ``plain_images_per_s / engine_images_per_s - 1``, from the
fastest of ``--repeats`` alternating runs of each (the least disturbed by other jobs on a shared
CPU, timeit's rule; the ratio of the medians is reported too).

FLOPs per image come from ``torch.utils.flop_counter.FlopCounterMode`` (forward, and forward +
backward, which is what a training step costs); the achieved rate is training FLOPs x images/s,
compared with the device's matmul rate measured here (square ``torch.mm``): fp32 with the same
threads on a CPU; on CUDA in the autocast dtype the engine trains with (bfloat16 where the GPU has
it, else float16: the tensor-core rate), so the fraction says how much of the GPU the loop uses.

On CUDA (``--device cuda``) both loops train as the engine does there: autocast in
:func:`components.training.runtime.amp_dtype`, a ``GradScaler`` for float16, channels-last weights
(:func:`~components.training.runtime.prefers_channels_last`), and every timing ends with
``torch.cuda.synchronize``. ``scripts/gpu_check.sh`` runs it with a GPU-sized workload.

Writes ``benchmarks/results/engine.json`` and prints a table. Figures are from a CPU shared with
other jobs: compare them within one run, not across machines or runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from components.config import AugmentConfig, TrainConfig  # noqa: E402
from components.engine import (  # noqa: E402
    build_loader,
    build_optimizer,
    build_scheduler,
    fit,
    resolve_device,
    seed_everything,
    synchronize,
)
from components.io import write_json  # noqa: E402
from components.models.classifier import classification_step  # noqa: E402
from components.models.registry import get_model  # noqa: E402
from components.training.runtime import amp_dtype, needs_grad_scaler, prefers_channels_last  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "engine.json"
NUM_CLASSES = 10


class AugmentedImages(Dataset):
    """``n`` random uint8 32x32 images in memory, augmented on the fly with the ``basic`` preset."""

    def __init__(self, n: int, size: int):
        from components.augment import build_transforms

        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        self.transform = build_transforms("classification", AugmentConfig(), train=True, image_size=size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision import tv_tensors

        image = tv_tensors.Image(self.images[i].float() / 255.0)
        return self.transform(image).as_subclass(torch.Tensor), int(self.labels[i])


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return get_model("classification", "classifier", num_classes=NUM_CLASSES, backbone="convnet_small", weights=None)


def run_engine(data: Dataset, cfg: TrainConfig, out: Path) -> float:
    """Wall seconds of ``fit`` (everything the stage pays: progress, logging, checkpoints)."""
    seed_everything(cfg.seed)
    model = build_model()
    logged: list[dict] = []
    device = resolve_device(cfg.device)
    synchronize(device)
    start = time.perf_counter()
    fit(
        model, train_loader=build_loader(data, cfg, train=True), val_loader=None, step=classification_step, evaluate=None,
        cfg=cfg, out_dir=out, meta={"task": "classification", "model_name": "classifier", "model_args": {}},
        log_metrics=lambda metrics, epoch: logged.append(dict(metrics)), desc="bench",
    )
    synchronize(device)
    return time.perf_counter() - start


def run_plain(data: Dataset, cfg: TrainConfig) -> float:
    """Wall seconds of the plain loop over the same loader, optimiser and schedule (on CUDA: the same AMP and layout)."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    dtype = amp_dtype(device)
    model = build_model().to(device)
    if prefers_channels_last(model, device, amp=use_amp):
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and needs_grad_scaler(dtype))
    loader = build_loader(data, cfg, train=True)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=len(loader))
    synchronize(device)
    start = time.perf_counter()
    model.train()
    for _ in range(cfg.epochs):
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
                loss = nn.functional.cross_entropy(model(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
    synchronize(device)
    return time.perf_counter() - start


def flops_per_image(size: int, batch: int) -> dict[str, float]:
    """Forward and forward+backward FLOPs per image (FlopCounterMode counts a multiply-add as 2 FLOPs)."""
    model = build_model()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    with FlopCounterMode(display=False) as forward:
        model(x)
    with FlopCounterMode(display=False) as train:
        nn.functional.cross_entropy(model(x), y).backward()
    return {"forward": forward.get_total_flops() / batch, "train_step": train.get_total_flops() / batch}


def matmul_rate(n: int = 1024, repeats: int = 10, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> float:
    """Best-of GFLOP/s of an n x n matmul (2 n^3 FLOPs) on ``device`` in ``dtype`` (CPU: with the current thread count).

    On CUDA each timing brackets ``repeats`` back-to-back products with ``synchronize``, so kernel
    launch latency is amortised and the queue is drained before the clock stops.
    """
    device = device or torch.device("cpu")
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    inner = repeats if device.type == "cuda" else 1
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n**3 / best / 1e9


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: AMP + channels-last, rate vs the GPU's matmul")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (augmentation runs on the CPU; a GPU needs some)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    os.environ.setdefault("TQDM_DISABLE", "0")  # the engine's progress bar is part of what is measured
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=3e-3, device=args.device, seed=0, threads=args.threads,
                      scheduler="cosine", workers=args.workers, amp=True)
    device = resolve_device(args.device)
    dtype = amp_dtype(device) if device.type == "cuda" else torch.float32
    data = AugmentedImages(args.images, args.image_size)
    n_images = args.epochs * args.images

    engine_s, plain_s = [], []
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        run_plain(data, cfg.model_copy(update={"epochs": 1}))  # warm-up: allocator, kernels, imports
        for r in range(args.repeats):
            engine_s.append(run_engine(data, cfg, Path(tmp) / f"run{r}"))
            plain_s.append(run_plain(data, cfg))
            print(f"repeat {r + 1}/{args.repeats}: engine {engine_s[-1]:.2f} s, plain {plain_s[-1]:.2f} s", file=sys.stderr)
        ckpt_bytes = (Path(tmp) / "run0" / "last.pt").stat().st_size

    # best of the repeats: on a shared CPU the fastest run is the one least disturbed by other jobs
    # (timeit's rule); the medians are kept in the JSON too
    engine_ips = n_images / min(engine_s)
    plain_ips = n_images / min(plain_s)
    flops = flops_per_image(args.image_size, args.batch_size)
    peak = matmul_rate(8192 if device.type == "cuda" else 1024, device=device, dtype=dtype)
    achieved = flops["train_step"] * engine_ips / 1e9
    result = {
        "benchmark": "engine training throughput vs plain PyTorch loop",
        "model": "classifier(convnet_small), 10 classes",
        "settings": {**vars(args), "out": str(args.out)},
        "engine_images_per_s": round(engine_ips, 1),
        "plain_images_per_s": round(plain_ips, 1),
        "engine_overhead_percent": round(100 * (plain_ips / engine_ips - 1), 2),
        "engine_overhead_percent_of_medians": round(100 * (statistics.median(engine_s) / statistics.median(plain_s) - 1), 2),
        "engine_seconds": [round(s, 3) for s in engine_s],
        "plain_seconds": [round(s, 3) for s in plain_s],
        "checkpoint_bytes": ckpt_bytes,
        "forward_gflops_per_image": round(flops["forward"] / 1e9, 5),
        "train_gflops_per_image": round(flops["train_step"] / 1e9, 5),
        "achieved_gflops_per_s": round(achieved, 2),
        "matmul_gflops_per_s": round(peak, 2),
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "fraction_of_matmul_rate": round(achieved / peak, 4),
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "cpu_count": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__, "platform": platform.platform(),
                    "load_average_1min": round(os.getloadavg()[0], 2)},
        "note": "CPU shared with other jobs while measured; engine and plain runs alternate so both see the same load",
    }
    rows = [
        ("engine images/s", result["engine_images_per_s"]),
        ("plain loop images/s", result["plain_images_per_s"]),
        ("engine overhead %", result["engine_overhead_percent"]),
        ("forward GFLOPs / image", result["forward_gflops_per_image"]),
        ("train-step GFLOPs / image", result["train_gflops_per_image"]),
        ("achieved GFLOP/s (engine)", result["achieved_gflops_per_s"]),
        (f"{result['matmul_dtype']} matmul GFLOP/s ({result['machine']['device']})", result["matmul_gflops_per_s"]),
        ("fraction of matmul rate", result["fraction_of_matmul_rate"]),
        ("load average (1 min)", result["machine"]["load_average_1min"]),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
