"""One exception type per failure family.

Every error carries the file, the record and the fix, so the CLI can print one line
(``str(err)``) and exit 2 instead of a traceback from deep inside a library.
"""

from __future__ import annotations


class VisionflowError(Exception):
    """Base of every user-facing error.

    Args:
        message: what went wrong.
        file: the file (or directory) concerned, if any.
        record: the record inside it (an id, a key path, a line), if any.
        fix: what the user should do about it.
    """

    exit_code = 2

    def __init__(self, message: str, *, file: object = None, record: object = None, fix: str | None = None):
        self.message = message
        self.file = None if file is None else str(file)
        self.record = None if record is None else str(record)
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = ""
        if self.file:
            where += f"{self.file}"
        if self.record:
            where += f"{' ' if where else ''}[{self.record}]"
        text = f"{where}: {self.message}" if where else self.message
        if self.fix:
            text += f" (fix: {self.fix})"
        return text


class ConfigError(VisionflowError):
    """params.yaml or a --set override is invalid."""


class DataError(VisionflowError):
    """A dataset, an annotation file or an image is unusable."""


class CheckpointError(VisionflowError):
    """A checkpoint or weights file cannot be used."""


class EvaluationError(VisionflowError):
    """Ground-truth or prediction files for evaluation are invalid."""


class TrainingError(VisionflowError):
    """Training diverged (NaN/inf loss) or cannot proceed."""


class TrackingError(VisionflowError):
    """The MLflow tracking server or registry is unusable (transient: a retry may cure it)."""

    exit_code = 75  # EX_TEMPFAIL: the pipeline retries a stage that exits with it


#: the exit code of a failure a retry may cure (a tracking server down, an I/O or network error)
TRANSIENT_EXIT_CODE = 75
