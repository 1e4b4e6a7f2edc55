"""Errors that the command line turns into one-line messages and exit code 2.

Every user-facing error names *where* the problem is (file and key, or flag) and *what is allowed*,
so that a user can fix the input without reading a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping


def closest_match(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word`` (a likely typo of it), or ``None`` when none is close.

    Matching ignores case and treats ``-`` and ``_`` alike (``local_epochs`` finds
    ``local-epochs``); it uses :func:`difflib.get_close_matches` with a 0.6 similarity cutoff,
    else the one candidate that ``word`` (3 characters or more) is the beginning of.
    """
    names = list(candidates)

    def norm(text: str) -> str:
        return text.lower().replace("_", "-")

    by_norm = {norm(n): n for n in names}
    hits = difflib.get_close_matches(norm(word), list(by_norm), n=1, cutoff=0.6)
    if hits:
        return by_norm[hits[0]]
    # a shortened name ("noise" for "noise-multiplier"): the one candidate it begins
    starts = [n for key, n in by_norm.items() if len(word) >= 3 and key.startswith(norm(word))]
    return starts[0] if len(starts) == 1 else None


def unknown_key_message(
    word: str,
    allowed: Iterable[str],
    *,
    what: str = "key",
    extra: Mapping[str, Iterable[str]] | None = None,
) -> str:
    """One-line message for an unknown ``word``: a suggestion when one is close, then every allowed name.

    Every place that reports an unknown scenario key, plug-in parameter or name uses this, so a
    typo always reads the same way::

        unknown key 'lrr' (did you mean 'lr'?); allowed: batch-size, local-epochs, lr, trainer;
        parameters of trainer 'sgd': batched, workers

    (one line; wrapped here). The suggestion is the closest name among ``allowed`` and every
    group of ``extra``.

    Parameters
    ----------
    word:
        What the user wrote.
    allowed:
        The accepted names (listed sorted, without duplicates).
    what:
        What ``word`` is, for the message (``"key"``, ``"parameter"``, ``"flag"``).
    extra:
        Further accepted names in labelled groups (a plug-in's constructor parameters next to
        the section's own keys), listed after ``allowed`` as ``label: a, b``.
    """
    names = sorted(set(allowed))
    groups = [(label, sorted(set(items))) for label, items in (extra or {}).items()]
    everything = names + [n for _, items in groups for n in items]
    guess = closest_match(word, everything)
    hint = f" (did you mean {guess!r}?)" if guess is not None else ""
    text = f"unknown {what} {word!r}{hint}; allowed: {', '.join(names) if names else '(none)'}"
    for label, items in groups:
        text += f"; {label}: {', '.join(items) if items else '(none)'}"
    return text


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


class ScenarioNote(UserWarning):
    """Something the scenario loader changed on the user's behalf (a note, not an error).

    The command line prints it as one line ``note: ...``; from Python it is an ordinary warning.
    """


class UpdateRejected(FedsimError):
    """A client update failed server-side validation (used for logging; updates are counted)."""
