"""The project's own exceptions. Their message is one line that names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class MedlensError(Exception):
    """A user-facing error: the CLI prints ``str(err)`` on one line and exits non-zero."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        text = f"{self.path}: {message}" if self.path else message
        super().__init__(" ".join(text.split()))  # always one line


class DataError(MedlensError):
    """A missing, corrupt or malformed input file or dataset."""


class ConfigError(MedlensError):
    """A config file with an unknown key, a bad value or a bad type."""


class ShapeError(MedlensError):
    """An array whose shape does not fit what the model or operation expects."""


class MedlensWarning(UserWarning):
    """Something the user should know that does not stop the work (padding, skipped rows, gaps).
    The CLI prints these as one ``warning: ...`` line while silencing library chatter."""
