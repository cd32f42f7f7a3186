"""One small registry per task that refuses duplicate names (torchvision ``models/_api.py``, timm).

Builders are typed, keyword-only functions ``def name(*, num_classes: int, ...) -> nn.Module``
registered under a task: ``"classification"``, ``"backbone"``, ``"detection"``, ``"segmentation"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from components.errors import ConfigError

TASKS = ("backbone", "classification", "detection", "segmentation")
_REGISTRY: dict[str, dict[str, Callable[..., nn.Module]]] = {task: {} for task in TASKS}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(task: str, name: str | None = None) -> Callable[[F], F]:
    """Register a builder under ``task``; a second builder with the same name is refused."""
    if task not in _REGISTRY:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")

    def wrapper(fn: F) -> F:
        key = name or fn.__name__
        if key in _REGISTRY[task]:
            raise ValueError(f"a {task} model named {key!r} is already registered")
        _REGISTRY[task][key] = fn
        return fn

    return wrapper


def _ensure_loaded() -> None:
    from components.models import load_all

    load_all()


def list_models(task: str) -> list[str]:
    """Sorted names of the builders registered for ``task``."""
    _ensure_loaded()
    return sorted(_REGISTRY[task])


def get_model_builder(task: str, name: str) -> Callable[..., nn.Module]:
    _ensure_loaded()
    try:
        return _REGISTRY[task][name]
    except KeyError:
        raise ConfigError(
            f"unknown {task} model {name!r}", record=name, fix=f"use one of {sorted(_REGISTRY.get(task, {}))}"
        ) from None


def get_model(task: str, name: str, **kwargs: Any) -> nn.Module:
    """Build ``name`` for ``task``; ``None`` overrides are dropped so the builder's defaults apply (timm)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return get_model_builder(task, name)(**kwargs)
