"""Where training runs: device, seeds, ``torch.distributed`` helpers, CPU threads, progress lines."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from components.errors import ConfigError

# --------------------------------------------------------------------------- distributed


def is_distributed() -> bool:
    """True inside a ``torchrun`` process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Only rank 0 evaluates, logs and writes files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


# --------------------------------------------------------------------------- device and seeds


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when present (``cuda:$LOCAL_RANK`` under torchrun), else CPU.

    Raises:
        ConfigError: ``"cuda"`` was asked for on a machine without CUDA.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}", record="train.device", fix="use auto, cpu or cuda")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is visible", record="train.device", fix="set train.device: auto or cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def amp_dtype(device: torch.device, *, bf16_supported: bool | None = None) -> torch.dtype:
    """The autocast dtype of mixed precision on ``device``: bfloat16 where the GPU has it, else float16.

    bfloat16 (Ampere and newer: compute capability >= 8.0) keeps float32's exponent range, so its
    gradients need no loss scaling; float16 (older GPUs) underflows small gradients and is paired
    with a :class:`torch.amp.GradScaler` (:func:`needs_grad_scaler`). On a CPU autocast is not used
    by the engine; bfloat16 is returned for completeness.

    Args:
        device: the training device.
        bf16_supported: whether the CUDA device runs bfloat16 natively (None: ask torch; tests pass a
            fake capability so the CUDA branch is checked on a CPU-only machine).
    """
    if device.type != "cuda":
        return torch.bfloat16
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if bf16_supported else torch.float16


def needs_grad_scaler(dtype: torch.dtype) -> bool:
    """True for float16 autocast: its narrow exponent needs the loss scaled so small gradients do not flush to zero."""
    return dtype == torch.float16


def prefers_channels_last(model: nn.Module, device: torch.device, *, amp: bool) -> bool:
    """Whether to store ``model``'s weights channels-last (NHWC) for training on ``device``.

    Channels-last lets cuDNN pick tensor-core convolution kernels without layout transposes: it
    helps convnets under mixed precision on CUDA (PyTorch's channels-last tutorial), and does
    nothing useful on a CPU or for a model without 2-D convolutions. cuDNN follows the weight's
    layout, so the input batches (lists of images for detection) need no conversion.
    """
    return device.type == "cuda" and amp and any(isinstance(m, nn.Conv2d) for m in model.modules())


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA), so that a wall-clock timing covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all CUDA devices) and make cuDNN pick deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def epoch_seed(seed: int, epoch: int) -> int:
    """The sampler seed of ``epoch``: data order is a function of (seed, epoch) alone, hence resumable."""
    return (seed * 1_000_003 + epoch) % 2**63


def count_parameters(model: nn.Module, *, trainable: bool = False) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` when ``trainable``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


# --------------------------------------------------------------------------- threads and progress


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: leave torch's setting), then restore it.

    Every training stage wraps its whole body (data preparation, training, test evaluation) in
    this, with its ``train.threads``, so that test-time ``ms_per_image`` is measured with the
    threads training used.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def interactive() -> bool:
    """True when stderr is a terminal: progress bars then; plain lines otherwise (cron, Prefect, pipes)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)`` on a terminal, a disabled (silent, pass-through) bar otherwise.

    A loop run under a scheduler reports with :func:`log_line` instead: one line per epoch or per
    pass over a split, not tqdm's carriage-return stream.
    """
    from tqdm.auto import tqdm

    if not interactive() or not is_main_process():
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


def log_line(message: str) -> None:
    """One progress line on stderr, flushed at once (rank 0 only); stdout is left to the CLI's result."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)
