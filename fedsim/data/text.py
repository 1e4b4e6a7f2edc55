"""Text to next-token sequences: the one tokenisation of fedsim's text datasets.

Used by the Shakespeare loader (:mod:`fedsim.data.shakespeare`) and by raw text files
(:mod:`fedsim.data.files`: a JSONL / CSV file with a user-id and a text column), so both see the
same vocabularies, special ids and sequence layout. A user's text is a list of *lines* (a
speech, a message, a post); lines are tokenised in order.

Two tokenisers:

* ``"char"``: TensorFlow Federated's Shakespeare character vocabulary (:data:`CHARS`: 86
  characters, letters, digits, space, newline, carriage return and 21 punctuation marks) plus
  the 4 special ids: 90 symbols; any other character is OOV. Each line becomes
  ``BOS c1 ... cn EOS``; a user's lines are concatenated and cut into pieces of
  ``seq_length + 1`` ids (the last one padded); input = piece[:-1], target = piece[1:] (TFF
  ``char_prediction_preprocessing``; default ``seq_length`` 80).
* ``"word"``: lower-cased words (``[a-z]+('[a-z]+)*``: punctuation dropped, inner apostrophes
  kept), a closed vocabulary of the ``vocab_size`` most frequent words of the *training* text
  (ties broken alphabetically) plus the special ids; every sentence (a line cut after ``.``,
  ``!`` or ``?``) becomes one row ``BOS w1 ... wn EOS``, truncated to ``seq_length + 1`` ids and
  padded (default ``seq_length`` 20).

Ids: ``0`` pad, ``1`` OOV, ``2`` BOS, ``3`` EOS, then the symbols. Next-token accuracy leaves out
targets that are pad, OOV or EOS (:func:`next_token_spec`; BOS is never a target).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedsim.data.spec import DataSpec
from fedsim.errors import ScenarioError

__all__ = [
    "BOS",
    "CHARS",
    "DEFAULT_SEQ_LENGTH",
    "DEFAULT_VOCAB_SIZE",
    "EOS",
    "NUM_SPECIAL",
    "OOV",
    "PAD",
    "SPECIAL_SYMBOLS",
    "TOKENIZERS",
    "TextDataError",
    "TokenizedText",
    "build_word_vocab",
    "char_vocab",
    "encode_chars",
    "encode_words",
    "next_token_spec",
    "sentences_of",
    "tokenize",
    "words_of",
]

PAD, OOV, BOS, EOS = 0, 1, 2, 3
#: Number of special ids before the first symbol.
NUM_SPECIAL = 4
#: The text of the special ids.
SPECIAL_SYMBOLS: tuple[str, ...] = ("<pad>", "<oov>", "<bos>", "<eos>")
#: The tokenisers (``tokenizer`` / Shakespeare's ``level``).
TOKENIZERS: tuple[str, ...] = ("char", "word")
#: ``seq_length`` when none is given.
DEFAULT_SEQ_LENGTH: dict[str, int] = {"char": 80, "word": 20}
#: The word vocabulary's size when none is given (at most the training text's distinct words).
DEFAULT_VOCAB_SIZE = 10000

#: TFF's Shakespeare character vocabulary (86 characters), in a readable order.
CHARS: str = string.ascii_letters + string.digits + " \n\r" + "!\"#$%&'()*,-./:;?@[]_"
assert len(CHARS) == 86 and len(set(CHARS)) == 86

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


class TextDataError(ScenarioError):
    """Text that cannot become the requested sequences (names the key, e.g. ``data.vocab-size``)."""


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


def sentences_of(line: str) -> list[list[str]]:
    """The sentences of a line (cut after ``.``, ``!``, ``?``) as word lists; empty ones dropped."""
    out = []
    for sentence in _SENTENCE_END.split(line):
        words = words_of(sentence)
        if words:
            out.append(words)
    return out


def build_word_vocab(lines: Iterable[str | list[str]], vocab_size: int | None) -> dict[str, int]:
    """The ``vocab_size`` most frequent words of ``lines`` -> ids ``4 ..`` (ties alphabetical).

    ``lines`` are texts, or already split word lists (:func:`words_of`). ``vocab_size`` ``None``:
    every distinct word, at most :data:`DEFAULT_VOCAB_SIZE`.

    Raises
    ------
    TextDataError
        When the text has fewer than ``vocab_size`` distinct words (key ``data.vocab-size``).
    """
    if vocab_size is not None and vocab_size < 1:
        raise TextDataError(f"must be >= 1, got {vocab_size}", key="data.vocab-size")
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(words_of(line) if isinstance(line, str) else line)
    if vocab_size is None:
        vocab_size = min(DEFAULT_VOCAB_SIZE, len(counts))
    if vocab_size > len(counts):
        raise TextDataError(
            f"{vocab_size} is larger than the {len(counts)} distinct words of the training text "
            f"(choose at most {len(counts)})",
            key="data.vocab-size",
        )
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab_size]
    return {w: NUM_SPECIAL + i for i, (w, _) in enumerate(ranked)}


def encode_words(
    lines: Iterable[str | list[list[str]]], vocab: dict[str, int], seq_length: int = 20
) -> np.ndarray:
    """One row ``BOS w1 .. wn EOS`` (truncated to ``seq_length + 1``, padded) per sentence.

    ``lines`` are texts, or lines already split by :func:`sentences_of`.
    """
    rows: list[list[int]] = []
    get = vocab.get
    for line in lines:
        for words in sentences_of(line) if isinstance(line, str) else line:
            ids = [BOS, *(get(w, OOV) for w in words[:seq_length]), EOS]
            rows.append(ids[: seq_length + 1])
    out = np.full((len(rows), seq_length + 1), PAD, dtype=np.int64)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = ids
    return out


@dataclass(frozen=True)
class TokenizedText:
    """Users' text as id matrices ``[n, seq_length + 1]`` (input = ``[:, :-1]``, target = ``[:, 1:]``).

    ``train[i]`` / ``test[i]`` are user ``i``'s; ``symbols[j]`` is the text of id ``j``.
    """

    tokenizer: Literal["char", "word"]
    train: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]
    symbols: tuple[str, ...]
    seq_length: int

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ones included (the model's output size)."""
        return len(self.symbols)

    def spec(self) -> DataSpec:
        """The :class:`~fedsim.data.spec.DataSpec` of these sequences (:func:`next_token_spec`)."""
        return next_token_spec(self.seq_length, self.vocab_size)


def next_token_spec(seq_length: int, vocab_size: int) -> DataSpec:
    """A next-token spec with fedsim's special ids (pad 0 carries no loss; OOV 1 and EOS 3 are
    left out of the accuracy)."""
    return DataSpec("next-token", (seq_length,), vocab_size, pad_id=PAD, oov_ids=(OOV,), eos_id=EOS)


def tokenize(
    train: Sequence[Sequence[str]],
    test: Sequence[Sequence[str]],
    *,
    tokenizer: str = "char",
    seq_length: int | None = None,
    vocab_size: int | None = DEFAULT_VOCAB_SIZE,
    vocab_text: Sequence[Sequence[str]] | None = None,
) -> TokenizedText:
    """Tokenise every user's training and held-out lines.

    Parameters
    ----------
    train, test:
        ``train[i]`` and ``test[i]`` are user ``i``'s lines (either may be empty).
    tokenizer:
        ``"char"`` or ``"word"`` (see the module docstring).
    seq_length:
        Model input length (default 80 for characters, 20 for words).
    vocab_size:
        Words only: the closed vocabulary's size, from the training lines (``None``: every
        distinct word, at most :data:`DEFAULT_VOCAB_SIZE`).
    vocab_text:
        Words only: take the vocabulary from these users' lines instead of ``train`` (a public
        text's vocabulary for private data, the same for every population that names it).
    """
    if tokenizer not in TOKENIZERS:
        raise TextDataError(f"must be 'char' or 'word', got {tokenizer!r}", key="data.tokenizer")
    seq_length = DEFAULT_SEQ_LENGTH[tokenizer] if seq_length is None else seq_length
    if seq_length < 1:
        raise TextDataError(f"must be >= 1, got {seq_length}", key="data.seq-length")
    if tokenizer == "char":
        vocab = char_vocab()
        train_rows = tuple(encode_chars(lines, seq_length, vocab) for lines in train)
        test_rows = tuple(encode_chars(lines, seq_length, vocab) for lines in test)
    else:
        split = [[sentences_of(line) for line in lines] for lines in train]
        source = split if vocab_text is None else [[sentences_of(line) for line in lines] for lines in vocab_text]
        vocab = build_word_vocab((words for lines in source for line in lines for words in line), vocab_size)
        train_rows = tuple(encode_words(lines, vocab, seq_length) for lines in split)
        test_rows = tuple(encode_words(lines, vocab, seq_length) for lines in test)
    symbols = SPECIAL_SYMBOLS + tuple(sorted(vocab, key=vocab.__getitem__))
    return TokenizedText(tokenizer, train_rows, test_rows, symbols, seq_length)  # type: ignore[arg-type]
