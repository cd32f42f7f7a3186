"""Small file helpers, one copy each: atomic writes, JSON, content hashes, DVC's folder hash.

Atomic means a temp file in the destination's own folder (same file system), then
``os.replace``: a reader sees the old file or the new one, never half of one, and a crash leaves
at most a ``.<name>.*.tmp`` file beside it. Standard library only (``dvc_data`` imported inside
:func:`dvc_hash`), so any module may import this one without cost.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "content_hash",
    "dvc_hash",
    "json_text",
    "read_json",
    "sha256_file",
    "write_json",
]


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then ``os.replace``).

    The parent folder is created. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def _plain(x: Any) -> Any:
    """``x`` with NaN as None and numpy scalars as Python numbers, recursively (dicts, lists, tuples)."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and type(x).__module__ == "numpy":
        return _plain(x.item())
    return x


def json_text(data: Any, *, indent: int | None = 2, ensure_ascii: bool = True) -> str:
    """JSON text of ``data`` with a trailing newline, keys in insertion order; NaN written as ``null``.

    Args:
        data: plain data; numpy scalars are written as the Python numbers they hold.
        indent: 2 (the metrics, reports and plots files) or None for compact output without
            spaces (``","``, ``":"``: the canonical dataset's annotation files).
        ensure_ascii: escape non-ASCII characters (``json.dumps``' default).
    """
    separators = (",", ":") if indent is None else None
    try:  # the common case: nothing to clean, no second pass over a large annotation file
        text = json.dumps(
            data, indent=indent, separators=separators, ensure_ascii=ensure_ascii, allow_nan=False
        )
    except (ValueError, TypeError):
        text = json.dumps(_plain(data), indent=indent, separators=separators, ensure_ascii=ensure_ascii)
    return text + "\n"


def write_json(data: Any, path: Path, *, indent: int | None = 2, ensure_ascii: bool = True) -> Path:
    """Write ``data`` as JSON (see :func:`json_text`) atomically; returns ``path``.

    The same data always gives the same bytes (no timestamps, insertion key order), so JSON
    outputs of DVC stages hash the same when nothing changed.
    """
    return atomic_write_text(path, json_text(data, indent=indent, ensure_ascii=ensure_ascii))


def read_json(path: Path) -> Any:
    """Parse the JSON file ``path``.

    Raises:
        OSError: the file cannot be read.
        json.JSONDecodeError, UnicodeDecodeError: it is not UTF-8 JSON.
    """
    with Path(path).open("rb") as f:
        return json.loads(f.read())


def sha256_file(path: Path, *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (the identity of a checkpoint: same bytes, same model)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(data: Any, *, length: int = 16) -> str:
    """A stable hash of plain data: sha256 of its JSON with sorted keys and no spaces, ``length`` hex digits.

    Values JSON cannot write are written as ``str(value)``.
    """
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def dvc_hash(path: Path) -> str:
    """The hash DVC records for ``path`` in ``dvc.lock``: a file's md5, or a folder's ``"<md5>.dir"``.

    Computed with dvc-data's own tree builder (the code ``dvc add`` and ``dvc repro`` run), in a
    dry run: nothing is cached.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import LocalFileSystem, MemoryFileSystem

    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(path)
    odb = HashFileDB(MemoryFileSystem(), "/visionflow-dvc-hash")
    _, _, obj = build(odb, str(path), LocalFileSystem(), "md5", dry_run=True)
    return str(obj.hash_info.value)
