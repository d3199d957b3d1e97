"""Corpus parsing, document split, tokenizers, the token cache and training windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anyformer.config import ConfigError
from anyformer.data import WindowSampler, markdown_play_to_text, prepare_tokens, shakespeare_plays, split_documents
from anyformer.tokenizers import load_tokenizer, save_tokenizer, train_tokenizer
from tests.training_helpers import write_corpus

MD = (
    "# A Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n_Thunder. Enter three Witches_\n\n"
    "**FIRST WITCH**  \nWhen shall we three meet again  \nIn thunder, lightning, or in rain?\n\n"
    "**SECOND WITCH**  \nWhen the hurlyburly\\'s done,\n\n_Exeunt_\n"
)


def test_markdown_to_plain_text() -> None:
    expected = (
        "A Play\n\nACT I\n\nSCENE I. A heath.\n\nThunder. Enter three Witches\n\n"
        "FIRST WITCH:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n"
        "SECOND WITCH:\nWhen the hurlyburly's done,\n\nExeunt\n"
    )
    assert markdown_play_to_text(MD) == expected


def test_shakespeare_split_holds_out_whole_plays() -> None:
    docs = shakespeare_plays()
    assert len(docs) >= 37
    text = "".join(t for _, t in docs)
    assert not any(c in text for c in "*_#") and "  \n" not in text
    train, val = split_documents(docs, 0.1)
    assert {n for n, _ in train}.isdisjoint({n for n, _ in val})
    assert len(train) + len(val) == len(docs)
    share = sum(len(t) for _, t in val) / len(text)
    assert 0.08 < share < 0.2
    assert split_documents(list(reversed(docs)), 0.1)[1] == val  # deterministic, order-free


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_tokenizer_round_trip_and_json(kind: str, tmp_path) -> None:
    text = markdown_play_to_text(MD) * 20
    tok = train_tokenizer(kind, text, 400)
    sample = "FIRST WITCH:\nWhen shall we three meet again"
    assert tok.decode(tok.encode(sample)) == sample
    save_tokenizer(tok, tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.encode(sample) == tok.encode(sample) and again.vocab_size == tok.vocab_size
    if kind == "byte":
        assert tok.encode("é") == list("é".encode())
    if kind == "bpe":
        assert len(tok.encode(text)) < len(text) / 2  # merges shorten the text


def test_char_tokenizer_rejects_unknown_characters() -> None:
    tok = train_tokenizer("char", "abc")
    with pytest.raises(ValueError, match="not in this character vocabulary"):
        tok.encode("abz")


def test_token_cache_reused(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "c", 5000)
    first = prepare_tokens("text", path=str(corpus), cache_dir=tmp_path / "cache", val_fraction=0.3)
    second = prepare_tokens("text", path=str(corpus), cache_dir=tmp_path / "cache", val_fraction=0.3)
    assert not first.cached and second.cached
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    texts = sorted(p.read_text() for p in corpus.glob("*.txt"))
    held_out = first.tokenizer.decode(np.asarray(first.val).tolist())
    assert held_out in texts  # one whole document, decoded back exactly


def test_windows_are_shifted_targets() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    s = WindowSampler(tokens, 16, seed=3)
    x, y = s.windows(s.starts(4))
    assert x.shape == (4, 16) and torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    state = s.state()
    a = s.starts(5)
    s.set_state(state)
    assert torch.equal(a, s.starts(5))


def test_text_corpus_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_tokens("text", path=str(tmp_path / "nope.txt"), cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="corpus"):
        prepare_tokens("wikipedia", cache_dir=tmp_path)
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt' is not UTF-8 text \(invalid continuation byte at byte 3\)"):
        prepare_tokens("text", path=str(tmp_path / "latin.txt"), cache_dir=tmp_path)
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="blank.txt' is empty"):
        prepare_tokens("text", path=str(tmp_path / "blank.txt"), cache_dir=tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="every .txt file in .* is empty"):
        prepare_tokens("text", path=str(tmp_path / "folder"), cache_dir=tmp_path)


def test_python_stdlib_corpus_is_the_source_files_each_opened_by_a_document_start(tmp_path) -> None:
    from anyformer.data.text import DOCUMENT_START, load_corpus

    (tmp_path / "pkg").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    return 2\n")
    (tmp_path / "pkg" / "latin.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8: left out
    (tmp_path / "notes.txt").write_text("not code")
    docs = load_corpus("python_stdlib", str(tmp_path))
    assert docs == [("a.py", DOCUMENT_START + "x = 1\n"), ("pkg/b.py", DOCUMENT_START + "def f():\n    return 2\n")]
    stdlib = dict(load_corpus("python_stdlib"))
    assert stdlib["json/__init__.py"] == DOCUMENT_START + open(json.__file__, encoding="utf-8").read()
    with pytest.raises(FileNotFoundError, match="no folder or file of Python code"):
        load_corpus("python_stdlib", str(tmp_path / "missing"))
