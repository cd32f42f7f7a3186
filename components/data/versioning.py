"""The DVC hash of a dataset folder: the digest MLflow records for the dataset input.

DVC identifies a directory output by the md5 of its ``.dir`` listing (``md5: <hex>.dir`` in
``dvc.lock`` / ``*.dvc``). We compute it with dvc-data's own tree builder, the code ``dvc add``
and ``dvc repro`` run, so the digest logged at ingest is the one DVC records for the same folder.
"""

from __future__ import annotations

from pathlib import Path

from components.errors import DataError


def dvc_directory_md5(path: Path) -> str:
    """``"<md5>.dir"`` exactly as DVC records the folder ``path`` in dvc.lock (dry run: nothing is cached).

    Raises:
        DataError: ``path`` is not a folder.
    """
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import LocalFileSystem, MemoryFileSystem

    path = Path(path)
    if not path.is_dir():
        raise DataError("not a folder", file=path, fix="ingest the dataset first")
    odb = HashFileDB(MemoryFileSystem(), "/visionflow-dvc-hash")
    _, _, obj = build(odb, str(path.resolve()), LocalFileSystem(), "md5", dry_run=True)
    return str(obj.hash_info.value)
