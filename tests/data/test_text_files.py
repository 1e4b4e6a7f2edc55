"""Raw text in: a JSONL / CSV file with a user-id and a text column becomes next-token data with
the Shakespeare loader's tokenisation (one implementation), worked by hand; bad text columns are
one-line errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedsim.data import shakespeare, text
from fedsim.data.files import load_file
from fedsim.engine import run_scenario
from fedsim.scenario import load_scenario, parse_override

from ..conftest import SCENARIOS, run_cli


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_characters_by_hand(tmp_path: Path) -> None:
    # ids: 0 pad, 1 OOV, 2 BOS, 3 EOS; a-z 4-29, A-Z 30-55, '!' 69, '.' 81 (TFF's 86 characters)
    path = _jsonl(tmp_path / "chat.jsonl", [
        {"user_id": "bob", "text": "Gé.", "split": "train"},
        {"user_id": "ann", "text": "Hi!", "split": "train"},
        {"user_id": "ann", "text": "Ok", "split": "test"},
    ])
    d = load_file(path, tokenizer="char", seq_length=3)
    # ann: BOS H i ! | EOS pad pad pad ; bob: BOS G <oov: é> . | EOS pad pad pad
    rows = [[2, 37, 12, 69], [3, 0, 0, 0], [2, 36, 1, 81], [3, 0, 0, 0]]
    assert d.x_train.tolist() == [r[:-1] for r in rows] and d.y_train.tolist() == [r[1:] for r in rows]
    assert d.user_ids.tolist() == ["ann", "ann", "bob", "bob"]
    assert d.x_test.tolist() == [[2, 44, 14]] and d.y_test.tolist() == [[44, 14, 3]]  # BOS O k EOS
    spec = d.spec
    assert (spec.task, spec.input_shape, spec.num_classes) == ("next-token", (3,), 90)
    assert (spec.pad_id, spec.oov_ids, spec.eos_id) == (0, (1,), 3)


def test_words_by_hand_from_csv(tmp_path: Path) -> None:
    path = tmp_path / "posts.csv"
    path.write_text(
        'user_id,body,split\n1,"The cat sat. The dog!",train\n2,"A cat? Yes",train\n1,the bird,test\n', encoding="utf-8"
    )
    d = load_file(path, tokenizer="word", text_column="body", vocab_size=3, seq_length=4)
    # training words: cat 2, the 2, then a, dog, sat, yes once each: vocabulary cat=4, the=5, a=6
    assert d.x_train.tolist() == [[2, 5, 4, 1], [2, 5, 1, 3], [2, 6, 4, 3], [2, 1, 3, 0]]
    assert d.y_train.tolist() == [[5, 4, 1, 3], [5, 1, 3, 0], [6, 4, 3, 0], [1, 3, 0, 0]]
    assert d.user_ids.tolist() == [1, 1, 2, 2]  # integer ids, sorted numerically
    assert d.x_test.tolist() == [[2, 5, 1, 3]]  # "the bird": bird is OOV
    assert d.spec.num_classes == 7
    # every distinct training word when vocab-size is not given
    assert load_file(path, tokenizer="word", text_column="body", seq_length=4).spec.num_classes == 4 + 6


def test_one_tokenisation_shared_with_shakespeare() -> None:
    assert shakespeare.encode_chars is text.encode_chars and shakespeare.encode_words is text.encode_words
    assert shakespeare.build_word_vocab is text.build_word_vocab
    lines = ["O Romeo, Romeo!", "Wherefore art thou Romeo?"]
    tokens = text.tokenize([lines], [[]], tokenizer="char", seq_length=10)
    assert np.array_equal(tokens.train[0], shakespeare.encode_chars(lines, 10))


def test_held_out_records_without_a_split_column_are_seeded(tmp_path: Path) -> None:
    records = [{"user_id": u, "text": f"line {i} of {u}."} for i in range(10) for u in ("a", "b", "c")]
    path = _jsonl(tmp_path / "t.jsonl", records)
    one = load_file(path, tokenizer="char", seq_length=8, seed=1, test_fraction=0.2)
    two = load_file(path, tokenizer="char", seq_length=8, seed=1, test_fraction=0.2)
    other = load_file(path, tokenizer="char", seq_length=8, seed=2, test_fraction=0.2)
    assert np.array_equal(one.x_test, two.x_test) and not np.array_equal(one.x_test, other.x_test)
    assert sorted(set(one.user_ids.tolist())) == ["a", "b", "c"]


def test_the_worked_example_runs(tmp_path: Path) -> None:
    sc = load_scenario(SCENARIOS / "text_neighbours.toml", [parse_override("rounds=2")])
    result = run_scenario(sc, run_dir=tmp_path / "run")
    assert result.summary["num_devices"] == 6
    assert result.summary["perplexity"] > 1 and result.metrics[-1]["accuracy"] is not None


def _error(tmp_path: Path, data: str, key: str, needle: str) -> None:
    scen = tmp_path / "s.toml"
    scen.write_text(
        f'name = "t"\nrounds = 1\nclients-per-round = 1\n[data]\n{data}\n[model]\nname = "lstm-lm"\nhidden = 4\nembedding = 4\nlayers = 1\n',
        encoding="utf-8",
    )
    proc = run_cli("run", str(scen), "--out", str(tmp_path / "run"), "--quiet")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {scen}: {key}: "), proc.stderr
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("records", "data", "key", "needle"),
    [
        ([{"user_id": "a", "body": "hi"}], 'tokenizer = "char"', "data.text-column", "line 1: no text column 'text' (set text-column"),
        ([{"user_id": "a", "text": " "}, {"user_id": "b", "text": ""}], 'tokenizer = "char"', "data.text-column",
         "column 'text' is empty for every user"),
        ([{"user_id": "a", "text": 5}], 'tokenizer = "word"', "data.dataset", "line 1: 'text' must be a string, got 5"),
        ([{"user_id": "a", "text": "hi there"}] * 4, 'tokenizer = "word"\nvocab-size = 9', "data.vocab-size",
         "9 is larger than the 2 distinct words"),
        ([{"user_id": "a", "text": "hi"}] * 4, 'tokenizer = "char"\nvocab-size = 9', "data.vocab-size", "applies to tokenizer = \"word\""),
        ([{"user_id": "a", "text": "hi"}] * 4, "", "data.dataset", "to read column 'text' as raw text set tokenizer"),
        ([{"user_id": "a", "text": "hi"}] * 4, 'tokenizer = "char"\nseq-length = 0', "data.seq-length", "must be >= 1, got 0"),
    ],
    ids=["missing-column", "empty-column", "not-a-string", "vocab-too-large", "vocab-for-chars", "no-tokenizer", "seq-length"],
)
def test_bad_text_files_are_one_line_errors(tmp_path: Path, records: list[dict], data: str, key: str, needle: str) -> None:
    _jsonl(tmp_path / "t.jsonl", records)
    _error(tmp_path, f'dataset = "t.jsonl"\n{data}', key, needle)


def test_missing_text_column_in_a_csv(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("user_id,message\na,hello\n", encoding="utf-8")
    _error(tmp_path, 'dataset = "t.csv"\ntokenizer = "char"', "data.text-column", "no text column 'text' (set text-column; columns: user_id, message)")
