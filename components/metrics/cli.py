"""Former home of :func:`~components.metrics.evaluate_files.evaluate_files`, kept while ``flows/cli.py`` imports it from here."""

from components.metrics.evaluate_files import evaluate_files

__all__ = ["evaluate_files"]
