"""The one exception type users see: a problem with a named file, said in one line."""

from __future__ import annotations

import os


class OnnxqError(Exception):
    """A user-facing error: which file, and what is wrong with it.

    The CLI prints ``str(error)`` as its single line of output and exits non-zero.
    """

    def __init__(self, path: str | os.PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self) -> tuple[type, tuple[str | None, str]]:
        """Pickled with both arguments: a Dask worker's error reaches the client as the same error."""
        return (type(self), (self.path, self.problem))


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name where it has none): what a one-line error quotes of it."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
