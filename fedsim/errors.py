"""Errors that the command line turns into one-line messages and exit code 2.

Every user-facing error names *where* the problem is (file and key, or flag) and *what is allowed*,
so that a user can fix the input without reading a traceback.
"""

from __future__ import annotations


class FedsimError(Exception):
    """Base class of errors that are the user's input, not a bug: the CLI prints them on one line."""

    exit_code: int = 2


class ScenarioError(FedsimError, ValueError):
    """A scenario file (or a command-line override of it) is invalid.

    Parameters
    ----------
    message:
        What is wrong and what is allowed.
    key:
        Dotted key inside the scenario (``client.lr``), or ``None`` for the file as a whole.
    source:
        The file (or ``--set``) the value came from.
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        self.message = message
        self.key = key
        self.source = source
        super().__init__(self.__str__())

    def with_source(self, source: str) -> ScenarioError:
        """Return the same error, attributed to ``source`` when it has none yet."""
        return ScenarioError(self.message, key=self.key, source=self.source or source)

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.key) if p]
        where = ": ".join(parts)
        return f"{where}: {self.message}" if where else self.message


class UpdateRejected(FedsimError):
    """A client update failed server-side validation (used for logging; updates are counted)."""
