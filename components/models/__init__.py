"""Models, built by name through :mod:`components.models.registry`.

Importing this package imports every family module so that their builders register.
"""

from components.models.registry import get_model, get_model_builder, list_models, register_model

__all__ = ["get_model", "get_model_builder", "list_models", "register_model", "load_all"]


def load_all() -> None:
    """Import every model family so that ``list_models()`` sees all builders."""
    import importlib
    import pkgutil

    import components.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "registry":
            importlib.import_module(f"components.models.{info.name}")
