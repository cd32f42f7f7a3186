"""One small registry per task that refuses duplicate names (torchvision ``models/_api.py``, timm).

Builders are typed, keyword-only functions ``def name(*, num_classes: int, ...) -> nn.Module``
registered under a task: ``"classification"``, ``"backbone"``, ``"detection"``, ``"segmentation"``.
A builder takes the arguments it needs itself (the backbone's name and weights) and passes every
other keyword through to the model class (``**kwargs``, as torchvision's builders do), so a
default is written once, in the class; :func:`passes_kwargs_to` makes the builder's signature
list the class's keywords too, so ``inspect.signature(builder)`` shows every accepted argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from torch import nn

from components.errors import ConfigError

TASKS = ("backbone", "classification", "detection", "segmentation")
_REGISTRY: dict[str, dict[str, Callable[..., nn.Module]]] = {task: {} for task in TASKS}

F = TypeVar("F", bound=Callable[..., nn.Module])

#: Old names of renamed builders, per task: checkpoints and params written before a rename still
#: say the old name, and every lookup by name (:func:`get_model_builder`, the backbone loader)
#: maps it here, in one place. ``vfnet_small`` was renamed ``convnet_small``: "vfnet" read as
#: VarifocalNet, a detector this project does not implement.
RENAMED_MODELS: dict[str, dict[str, str]] = {"backbone": {"vfnet_small": "convnet_small"}}


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


def passes_kwargs_to(target: Callable[..., Any], *, exclude: Iterable[str] = ()) -> Callable[[F], F]:
    """Declare that a builder passes its ``**kwargs`` to ``target`` (a model class or a build function).

    The builder's signature becomes its own keyword parameters followed by ``target``'s
    keyword-only parameters that it does not take itself (nor ``exclude``: those it fills in,
    such as a built backbone module), with ``target``'s defaults and annotations. Callers that
    inspect the signature (the detect stage checks params keys against it; the registry tests)
    then see every accepted argument, while each default stays written in ``target`` only.
    """

    def wrapper(fn: F) -> F:
        own = inspect.signature(fn)
        params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in params} | set(exclude)
        passed = [
            p
            for p in inspect.signature(target).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in taken
        ]
        fn.__signature__ = own.replace(parameters=[*params, *passed])  # type: ignore[attr-defined]
        return fn

    return wrapper


def resolve_model_name(task: str, name: str) -> str:
    """Today's name of ``name`` for ``task``: the new name of a renamed builder, else ``name`` itself."""
    return RENAMED_MODELS.get(task, {}).get(name, name)


def _ensure_loaded() -> None:
    from components.models import load_all

    load_all()


def list_models(task: str) -> list[str]:
    """Sorted names of the builders registered for ``task`` (one of :data:`TASKS`)."""
    if task not in _REGISTRY:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
    _ensure_loaded()
    return sorted(_REGISTRY[task])


def get_model_builder(task: str, name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name`` for ``task``.

    Raises:
        ConfigError: no such model (the message lists the registered names).
    """
    _ensure_loaded()
    try:
        return _REGISTRY[task][resolve_model_name(task, name)]
    except KeyError:
        raise ConfigError(
            f"unknown {task} model {name!r}", record=name, fix=f"use one of {sorted(_REGISTRY.get(task, {}))}"
        ) from None


def get_model(task: str, name: str, **kwargs: Any) -> nn.Module:
    """Build ``name`` for ``task``; ``None`` overrides are dropped so the builder's defaults apply (timm)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return get_model_builder(task, name)(**kwargs)
