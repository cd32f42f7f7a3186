"""The DVC hash of a dataset folder: the digest MLflow records for the dataset input.

DVC identifies a directory output by the md5 of its ``.dir`` listing (``md5: <hex>.dir`` in
``dvc.lock`` / ``*.dvc``). :func:`components.io.dvc_hash` computes it with dvc-data's own tree
builder, the code ``dvc add`` and ``dvc repro`` run, so the digest logged at ingest is the one DVC
records for the same folder.
"""

from __future__ import annotations

from pathlib import Path

from components.errors import DataError
from components.io import dvc_hash


def dvc_directory_md5(path: Path) -> str:
    """``"<md5>.dir"`` exactly as DVC records the folder ``path`` in dvc.lock (dry run: nothing is cached).

    Raises:
        DataError: ``path`` is not a folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError("not a folder", file=path, fix="ingest the dataset first")
    return dvc_hash(path)
