"""Safe extraction of ``.zip`` / ``.tar[.gz|.bz2|.xz]`` sources (``voc:data.zip`` etc.).

An archive is untrusted input: a member named ``../../x`` or ``/etc/x``, or a link pointing out of
the target, would write outside the folder it is extracted to ("zip slip"). Every member is
checked *before* anything is written, and one bad member rejects the whole archive with a
:class:`DataError` naming it.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from components.errors import DataError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _check_member(archive: Path, name: str, target: Path) -> None:
    pure = PurePosixPath(name.replace("\\", "/"))
    resolved = (target / pure).resolve()
    if pure.is_absolute() or ".." in pure.parts or not resolved.is_relative_to(target.resolve()):
        raise DataError(
            f"archive member escapes the extraction folder: {name!r}",
            file=archive,
            record=name,
            fix="rebuild the archive with relative paths inside one folder",
        )


def extract_archive(archive: Path, target: Path) -> Path:
    """Extract ``archive`` into ``target`` after checking every member; return the dataset root.

    The root is ``target`` itself, or its only sub-folder when the archive wraps everything in
    one top-level folder (``dataset.zip`` -> ``dataset/...``).

    Raises:
        DataError: a member escapes ``target`` (absolute path, ``..``, a link out), or the archive is corrupt.
    """
    target.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member(archive, info.filename, target)
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise DataError(
                            f"archive member is a symbolic link: {info.filename!r}",
                            file=archive,
                            record=info.filename,
                            fix="store files, not links, in the archive",
                        )
                zf.extractall(target)
        else:
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for m in members:
                    _check_member(archive, m.name, target)
                    if m.issym() or m.islnk():
                        link = (
                            PurePosixPath(m.name).parent / m.linkname
                            if m.issym()
                            else PurePosixPath(m.linkname)
                        )
                        _check_member(archive, str(link), target)
                    if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                        raise DataError(
                            f"archive member is a device or fifo: {m.name!r}", file=archive, record=m.name
                        )
                tf.extractall(target, filter="data")  # the stdlib's own guard, on top of the checks above
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        raise DataError(
            f"corrupt or unreadable archive: {err}", file=archive, fix="re-create the archive"
        ) from None
    entries = [p for p in target.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else target


@contextmanager
def opened_source(path: Path) -> Iterator[Path]:
    """Yield ``path`` itself, or the root of its safe extraction into a temporary folder."""
    if not is_archive(path):
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="visionflow-ingest-"))
    try:
        yield extract_archive(path, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
