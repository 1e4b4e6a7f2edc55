"""The file loader: a ``.npz``, CSV or JSONL file with a user-id column, no code needed.

``[data] dataset = "data/reviews.jsonl"`` (a path ending in ``.npz``, ``.csv`` or ``.jsonl``,
relative to the scenario file first, then the working directory) becomes a naturally partitioned
dataset: one device per distinct user id, in sorted id order, every training example on exactly
one device.

Layouts (column / array names are parameters, defaults shown):

* ``.npz``: arrays ``x`` (inputs ``[n, ...]``), ``y`` (targets ``[n]`` or ``[n, L]``),
  ``user_id`` (``[n]``); optionally ``test_x`` and ``test_y`` (the server's test split).
* CSV (header row): a ``user_id`` column, a target column (``y``, else ``label``), an optional
  ``split`` column (``train`` / ``test``); every other column is a numeric feature.
  Classification only.
* JSONL (one JSON object per line): ``user_id``, ``x`` (a number or a nested list of numbers),
  ``y`` (an integer, or a list of token ids for next-token prediction), optional ``split``.

* **raw text** (JSONL or CSV, with ``tokenizer = "char"`` or ``"word"``): a user-id column and a
  text column (``text``, or ``text-column``), optional ``split``; one record is one line of its
  user's text (a message, a post), in file order. It becomes next-token sequences with fedsim's
  one tokenisation (:mod:`fedsim.data.text`, the Shakespeare loader's: ids 0 pad, 1 OOV, 2 BOS,
  3 EOS; characters: TFF's 86-symbol vocabulary; words: the ``vocab-size`` most frequent words
  of the training text, default every distinct word up to 10,000), ``seq-length`` (default 80
  characters / 20 words) ids per sequence. Without a ``split`` column a seeded
  ``test-fraction`` of the records is held out.

The task is ``"next-token"`` when targets are sequences (``y [n, L]``), else
``"classification"``. The number of classes is ``max(label) + 1`` over the train and test
targets; for next-token data ``vocab-size`` sets the vocabulary (default: the largest token id
plus one) and ``pad-id``, ``eos-id``, ``oov-ids`` name the special tokens. Without a test split in
the file, a seeded ``test-fraction`` of the examples is held out for the server.
"""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedsim.data.datasets import Dataset
from fedsim.data.spec import DataSpec
from fedsim.data.text import TextDataError, tokenize

#: File endings the loader reads.
SUFFIXES = (".npz", ".csv", ".jsonl")


class FileFormatError(ValueError):
    """A data file that cannot be read as a dataset; the message names the file and the problem."""


def is_data_file(name: str) -> bool:
    """Whether a ``[data] dataset`` value names a data file (rather than a dataset or a loader)."""
    return ":" not in name and name.lower().endswith(SUFFIXES)


def load_file(
    path: str | Path,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    user_column: str = "user_id",
    input_column: str = "x",
    target_column: str | None = None,
    split_column: str = "split",
    vocab_size: int | None = None,
    pad_id: int | None = None,
    eos_id: int | None = None,
    oov_ids: tuple[int, ...] = (),
    tokenizer: Literal["char", "word"] | None = None,
    text_column: str = "text",
    seq_length: int | None = None,
) -> Dataset:
    """Read a ``.npz`` / CSV / JSONL file into a naturally partitionable :class:`Dataset`.

    Parameters
    ----------
    path:
        The file.
    seed:
        Seed of the held-out test split (when the file has none).
    test_fraction:
        Share of the examples held out for the server when the file has no test split.
    user_column, input_column, target_column, split_column:
        Names of the user id, input, target and split columns / arrays (``target_column`` None:
        ``y``, else ``label``).
    vocab_size, pad_id, eos_id, oov_ids:
        Next-token data: vocabulary size (default: largest token id + 1) and special tokens.
        With ``tokenizer = "word"``, ``vocab_size`` is the number of words in the vocabulary.
    tokenizer, text_column, seq_length:
        Raw text (JSONL / CSV): ``"char"`` or ``"word"`` tokenisation of the ``text_column``
        into sequences of ``seq_length`` ids (see the module docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if tokenizer is not None:
        if pad_id is not None or eos_id is not None or oov_ids or target_column is not None or input_column != "x":
            raise _text_error(
                path,
                f"with tokenizer = {tokenizer!r} the ids are fedsim's (pad 0, OOV 1, BOS 2, EOS 3): pad-id, eos-id, "
                "oov-ids, target-column and input-column do not apply",
                "tokenizer",
            )
        return _load_text(path, seed, test_fraction, user_column, text_column, split_column, tokenizer, vocab_size, seq_length)
    if text_column != "text" or seq_length is not None:
        key = "text-column" if text_column != "text" else "seq-length"
        raise _text_error(path, "applies to raw text: set tokenizer = \"char\" or \"word\"", key)
    try:
        if suffix == ".npz":
            x, y, users, split, test = _read_npz(path, user_column, input_column, target_column)
        elif suffix == ".csv":
            x, y, users, split, test = _read_csv(path, user_column, target_column, split_column)
        elif suffix == ".jsonl":
            x, y, users, split, test = _read_jsonl(path, user_column, input_column, target_column, split_column)
        else:
            raise FileFormatError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, FileFormatError):
            raise
        raise FileFormatError(f"{path}: {exc}") from None
    if len(y) == 0:
        raise FileFormatError(f"{path}: no examples")
    if test is not None:
        x_train, y_train, u_train = x, y, users
        x_test, y_test = test
    elif split is not None:
        is_test = split == "test"
        unknown = sorted(set(np.unique(split).tolist()) - {"train", "test"})
        if unknown:
            raise FileFormatError(f"{path}: column {split_column!r} must be 'train' or 'test', got {unknown[0]!r}")
        x_train, y_train, u_train = x[~is_test], y[~is_test], users[~is_test]
        x_test, y_test = x[is_test], y[is_test]
    else:
        rng = np.random.default_rng([seed, 0xF11E])
        held = np.zeros(len(y), dtype=bool)
        held[rng.permutation(len(y))[: int(round(len(y) * test_fraction))]] = True
        x_train, y_train, u_train = x[~held], y[~held], users[~held]
        x_test, y_test = x[held], y[held]
    if len(y_train) == 0:
        raise FileFormatError(f"{path}: no training examples")
    if len(y_test) == 0:
        raise FileFormatError(f"{path}: no test examples (add a test split or raise test-fraction)")
    spec = _infer_spec(path, x, y, y_test, vocab_size, pad_id, eos_id, tuple(oov_ids))
    return Dataset(path.name, x_train, y_train, x_test, y_test, spec.num_classes, spec=spec, user_ids=u_train)


# ----------------------------------------------------------------------------------------------


def _infer_spec(
    path: Path, x: np.ndarray, y: np.ndarray, y_test: np.ndarray,
    vocab_size: int | None, pad_id: int | None, eos_id: int | None, oov_ids: tuple[int, ...],
) -> DataSpec:
    if not np.issubdtype(y.dtype, np.integer):
        raise FileFormatError(f"{path}: targets must be integers, got {y.dtype}")
    if y.ndim == 2:
        if not np.issubdtype(x.dtype, np.integer):
            raise FileFormatError(f"{path}: next-token inputs must be integer token ids, got {x.dtype}")
        if x.shape != y.shape:
            raise FileFormatError(f"{path}: next-token inputs {x.shape[1:]} and targets {y.shape[1:]} differ in length")
        top = int(max(x.max(), y.max(), y_test.max() if y_test.size else 0)) + 1
        vocab = top if vocab_size is None else int(vocab_size)
        if vocab < top:
            raise FileFormatError(f"{path}: token {top - 1} out of range for vocab-size {vocab}")
        try:
            return DataSpec("next-token", (int(x.shape[1]),), max(vocab, 2), pad_id=pad_id, oov_ids=oov_ids, eos_id=eos_id)
        except ValueError as exc:
            raise FileFormatError(f"{path}: {exc}") from None
    if y.ndim != 1:
        raise FileFormatError(f"{path}: targets must be labels [n] or token sequences [n, L], got shape {y.shape}")
    if vocab_size is not None or pad_id is not None or eos_id is not None or oov_ids:
        raise FileFormatError(f"{path}: vocab-size, pad-id, eos-id and oov-ids apply to next-token data (targets [n, L])")
    low = int(min(y.min(), y_test.min() if y_test.size else 0))
    if low < 0:
        raise FileFormatError(f"{path}: label {low} is negative")
    classes = int(max(y.max(), y_test.max() if y_test.size else 0)) + 1
    return DataSpec("classification", tuple(int(s) for s in x.shape[1:]) or (1,), max(classes, 2))


def _target_name(columns: list[str], target_column: str | None, path: Path) -> str:
    if target_column is not None:
        if target_column not in columns:
            raise FileFormatError(f"{path}: no target column {target_column!r} (columns: {', '.join(columns)})")
        return target_column
    for name in ("y", "label"):
        if name in columns:
            return name
    if "text" in columns:
        raise FileFormatError(
            f"{path}: no target column 'y' or 'label'; to read column 'text' as raw text set tokenizer = \"char\" or "
            f"\"word\" (columns: {', '.join(columns)})"
        )
    raise FileFormatError(f"{path}: no target column 'y' or 'label' (set target-column; columns: {', '.join(columns)})")


def _read_npz(path: Path, user: str, inputs: str, target: str | None) -> tuple[Any, ...]:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    names = sorted(arrays)
    for name in (user, inputs):
        if name not in arrays:
            raise FileFormatError(f"{path}: no array {name!r} (arrays: {', '.join(names)})")
    y_name = _target_name(names, target, path)
    x, y, users = arrays[inputs], arrays[y_name], arrays[user]
    if not (len(x) == len(y) == len(users)):
        raise FileFormatError(f"{path}: {inputs!r}, {y_name!r} and {user!r} have {len(x)}, {len(y)}, {len(users)} rows")
    if users.ndim != 1:
        raise FileFormatError(f"{path}: {user!r} must be one id per example, got shape {users.shape}")
    if x.ndim == 1:
        x = x[:, None]
    test = None
    if "test_x" in arrays or "test_y" in arrays:
        if not ("test_x" in arrays and "test_y" in arrays):
            raise FileFormatError(f"{path}: needs both test_x and test_y (or neither)")
        tx, ty = arrays["test_x"], arrays["test_y"]
        if tx.ndim == 1:
            tx = tx[:, None]
        if len(tx) != len(ty) or tx.shape[1:] != x.shape[1:] or ty.shape[1:] != y.shape[1:]:
            raise FileFormatError(f"{path}: test_x {tx.shape} / test_y {ty.shape} do not match x {x.shape} / y {y.shape}")
        test = (_inputs(tx, y.ndim), ty.astype(np.int64) if np.issubdtype(ty.dtype, np.integer) else ty)
    if np.issubdtype(y.dtype, np.integer):
        y = y.astype(np.int64)
    return _inputs(x, y.ndim), y, users, None, test


def _inputs(x: np.ndarray, target_ndim: int) -> np.ndarray:
    if target_ndim == 2 and np.issubdtype(x.dtype, np.integer):
        return x.astype(np.int64)
    if np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32)
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        return x.astype(np.float32)
    raise FileFormatError(f"inputs must be numeric, got {x.dtype}")


def _read_csv(path: Path, user: str, target: str | None, split_col: str) -> tuple[Any, ...]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise FileFormatError(f"{path}: empty file")
        header = [h.strip() for h in header]
        if user not in header:
            raise FileFormatError(f"{path}: no user column {user!r} (columns: {', '.join(header)})")
        y_name = _target_name(header, target, path)
        features = [i for i, h in enumerate(header) if h not in (user, y_name, split_col)]
        if not features:
            raise FileFormatError(f"{path}: no feature columns")
        ui, yi = header.index(user), header.index(y_name)
        si = header.index(split_col) if split_col in header else None
        xs, ys, us, ss = [], [], [], []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise FileFormatError(f"{path}: line {line} has {len(row)} fields, the header {len(header)}")
            try:
                xs.append([float(row[i]) for i in features])
                label = float(row[yi])
            except ValueError as exc:
                raise FileFormatError(f"{path}: line {line}: {exc}") from None
            if label != int(label):
                raise FileFormatError(f"{path}: line {line}: label {row[yi]!r} is not an integer")
            ys.append(int(label))
            us.append(row[ui].strip())
            if si is not None:
                ss.append(row[si].strip())
    users = np.asarray(us)
    with contextlib.suppress(ValueError):  # integer user ids sort numerically
        users = users.astype(np.int64)
    split = np.asarray(ss) if si is not None else None
    return np.asarray(xs, dtype=np.float32), np.asarray(ys, dtype=np.int64), users, split, None


def _read_jsonl(path: Path, user: str, inputs: str, target: str | None, split_col: str) -> tuple[Any, ...]:
    xs, ys, us, ss = [], [], [], []
    y_name = None
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FileFormatError(f"{path}: line {line_no}: invalid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise FileFormatError(f"{path}: line {line_no}: expected a JSON object")
            if y_name is None:
                y_name = _target_name(list(obj), target, path)
            for key in (user, inputs, y_name):
                if key not in obj:
                    raise FileFormatError(f"{path}: line {line_no}: no key {key!r}")
            xs.append(obj[inputs])
            ys.append(obj[y_name])
            us.append(obj[user])
            if split_col in obj:
                ss.append(str(obj[split_col]))
    if ss and len(ss) != len(ys):
        raise FileFormatError(f"{path}: {split_col!r} is on some lines and not on others")
    try:
        x = np.asarray(xs)
        y = np.asarray(ys)
    except ValueError:
        raise FileFormatError(f"{path}: examples have different shapes (every {inputs!r} and {target or 'y'!r} must have the same shape)") from None
    if x.dtype == object or y.dtype == object:
        raise FileFormatError(f"{path}: examples have different shapes or non-numeric values")
    if not (np.issubdtype(y.dtype, np.integer)):
        raise FileFormatError(f"{path}: targets must be integers, got {y.dtype}")
    if x.ndim == 1:
        x = x[:, None]
    users = np.asarray(us)
    if users.dtype == object:
        users = np.asarray([str(u) for u in us])
    return _inputs(x, y.ndim), y.astype(np.int64), users, (np.asarray(ss) if ss else None), None


# ----------------------------------------------------------------------------------------------
# raw text


def _load_text(
    path: Path, seed: int, test_fraction: float, user: str, text: str, split_col: str,
    tokenizer: str, vocab_size: int | None, seq_length: int | None,
) -> Dataset:
    """A JSONL / CSV file of ``(user, text[, split])`` records as a next-token :class:`Dataset`."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise _text_error(path, f"raw text is read from .jsonl or .csv files, not {suffix!r}", "tokenizer")
    if tokenizer == "char" and vocab_size is not None:
        raise _text_error(path, "applies to tokenizer = \"word\" (the characters are a fixed vocabulary)", "vocab-size")
    try:
        reader = _text_jsonl if suffix == ".jsonl" else _text_csv
        users, lines, split = reader(path, user, text, split_col)
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"{path}: {exc}") from None
    if not lines:
        raise FileFormatError(f"{path}: no records")
    if not any(line.strip() for line in lines):
        raise _text_error(path, f"column {text!r} is empty for every user", "text-column")
    if split is not None:
        unknown = sorted(set(split) - {"train", "test"})
        if unknown:
            raise FileFormatError(f"{path}: column {split_col!r} must be 'train' or 'test', got {unknown[0]!r}")
        held = np.asarray([s == "test" for s in split])
    else:  # the file loader's seeded hold-out, by record
        rng = np.random.default_rng([seed, 0xF11E])
        held = np.zeros(len(lines), dtype=bool)
        held[rng.permutation(len(lines))[: int(round(len(lines) * test_fraction))]] = True
    ids = np.asarray(users)
    with contextlib.suppress(ValueError, TypeError):  # integer user ids sort numerically
        ids = ids.astype(np.int64)
    order = sorted(set(ids.tolist()))
    index = {u: i for i, u in enumerate(order)}
    train_lines: list[list[str]] = [[] for _ in order]
    test_lines: list[list[str]] = [[] for _ in order]
    for u, line, is_test in zip(ids.tolist(), lines, held.tolist(), strict=True):
        if line.strip():
            (test_lines if is_test else train_lines)[index[u]].append(line)
    if not any(train_lines):
        raise FileFormatError(f"{path}: no training text (every non-empty record is held out)")
    try:
        tokens = tokenize(train_lines, test_lines, tokenizer=tokenizer, seq_length=seq_length, vocab_size=vocab_size)
    except TextDataError as exc:
        raise TextDataError(f"{path}: {exc.message}", key=exc.key) from None
    width = tokens.seq_length + 1
    train_rows = [rows for rows in tokens.train if len(rows)]
    if not train_rows:
        raise _text_error(path, f"the training text in column {text!r} has no words", "text-column")
    owners = np.concatenate([np.full(len(rows), u) for u, rows in zip(order, tokens.train, strict=True) if len(rows)])
    train = np.concatenate(train_rows) if train_rows else np.zeros((0, width), np.int64)
    test = np.concatenate([*tokens.test, np.zeros((0, width), np.int64)])
    if len(test) == 0:
        raise FileFormatError(f"{path}: no test examples (add a test split or raise test-fraction)")
    spec = tokens.spec()
    return Dataset(
        path.name, train[:, :-1].copy(), train[:, 1:].copy(), test[:, :-1].copy(), test[:, 1:].copy(),
        spec.num_classes, spec=spec, user_ids=owners,
    )


def _text_error(path: Path, message: str, key: str) -> TextDataError:
    """A raw-text problem on the ``[data]`` key it concerns (``data.text-column``, ...)."""
    return TextDataError(f"{path}: {message}", key=f"data.{key}")


def _text_value(value: Any, where: str, text: str) -> str:
    if not isinstance(value, str):
        raise FileFormatError(f"{where}: {text!r} must be a string, got {value!r}")
    return value


def _text_jsonl(path: Path, user: str, text: str, split_col: str) -> tuple[list[Any], list[str], list[str] | None]:
    users: list[Any] = []
    lines: list[str] = []
    split: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise FileFormatError(f"{path}: line {line_no}: invalid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise FileFormatError(f"{path}: line {line_no}: expected a JSON object")
            for key, what in ((user, "user"), (text, "text")):
                if key not in obj:
                    column = f"{what}-column"
                    raise _text_error(path, f"line {line_no}: no {what} column {key!r} (set {column}; keys: {', '.join(obj)})", column)
            if not isinstance(obj[user], str | int) or isinstance(obj[user], bool):
                raise FileFormatError(f"{path}: line {line_no}: user id {obj[user]!r} must be a string or an integer")
            users.append(obj[user])
            lines.append(_text_value(obj[text], f"{path}: line {line_no}", text))
            if split_col in obj:
                split.append(str(obj[split_col]))
    if split and len(split) != len(lines):
        raise FileFormatError(f"{path}: {split_col!r} is on some lines and not on others")
    return [str(u) if not isinstance(u, int) else u for u in users], lines, split or None


def _text_csv(path: Path, user: str, text: str, split_col: str) -> tuple[list[Any], list[str], list[str] | None]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise FileFormatError(f"{path}: empty file")
        header = [h.strip() for h in header]
        for key, what in ((user, "user"), (text, "text")):
            if key not in header:
                column = f"{what}-column"
                raise _text_error(path, f"no {what} column {key!r} (set {column}; columns: {', '.join(header)})", column)
        ui, ti = header.index(user), header.index(text)
        si = header.index(split_col) if split_col in header else None
        users: list[Any] = []
        lines: list[str] = []
        split: list[str] = []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise FileFormatError(f"{path}: line {line_no} has {len(row)} fields, the header {len(header)}")
            users.append(row[ui].strip())
            lines.append(row[ti])
            if si is not None:
                split.append(row[si].strip())
    return users, lines, split if si is not None else None
