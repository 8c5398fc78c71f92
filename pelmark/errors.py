"""The one exception type that reaches the user as a single line."""

from __future__ import annotations

from pathlib import Path


class PelmarkError(Exception):
    """A problem with the user's input, reported as one line naming the file.

    Args:
        message: what is wrong, in words a user can act on.
        path: the file or folder concerned, if any.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)
