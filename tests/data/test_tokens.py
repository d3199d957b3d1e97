"""Corpus parsing, document split, tokenizers, token cache, batches, schedule and decay groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from anyformer.config import ConfigError
from anyformer.data import WindowSampler, markdown_play_to_text, prepare_tokens, shakespeare_plays, split_documents
from anyformer.models.builders import build_model
from anyformer.nn.norm import LayerNorm, RMSNorm
from anyformer.tokenizers import load_tokenizer, save_tokenizer, train_tokenizer
from anyformer.training.config import TrainConfig
from anyformer.training.optim import lr_at, param_groups
from tests.training_helpers import tiny_config, write_corpus

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


def test_lr_schedule_shape() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg, 110) == pytest.approx(0.1) and lr_at(500, cfg, 110) == pytest.approx(0.1)


def test_weight_decay_groups(tmp_path) -> None:
    model = build_model(tiny_config(tmp_path).model)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})  # tied weight once
    assert id(model.embed.tokens.weight) in {id(p) for p in no_decay["params"]}
    norms = [m.weight for m in model.modules() if isinstance(m, (RMSNorm, LayerNorm))]
    assert norms and all(id(w) in {id(p) for p in no_decay["params"]} for w in norms)
    linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and m.weight is not model.embed.tokens.weight]
    assert all(id(w) in {id(p) for p in decay["params"]} for w in linears)


def test_text_corpus_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_tokens("text", path=str(tmp_path / "nope.txt"), cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="corpus"):
        prepare_tokens("wikipedia", cache_dir=tmp_path)
