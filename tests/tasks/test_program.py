"""Task 'program': a RASP program's output per position learned from examples (labels from
RASP's own evaluator, held-out inputs never among the training ones), and the word tokenizer
and norm-free layers it and the compiled models use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyformer.nn.norm import NoNorm
from anyformer.tokenizers import load_tokenizer, save_tokenizer
from anyformer.tokenizers.words import WordTokenizer
from tests.helpers import REPO


def test_word_tokenizer_round_trips_and_names_unknown_words(tmp_path: Path) -> None:
    tok = WordTokenizer(["BOS", "PAD", "1", "2", "10"])
    assert tok.encode(" 10  2\t1 ") == [4, 3, 2] and tok.decode([4, 3, 2]) == "10 2 1"
    save_tokenizer(tok, tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.words == tok.words and again.encode("1 10") == [2, 4]
    with pytest.raises(ValueError, match=r"'3', '7' are not in the vocabulary \(BOS PAD 1 2 10\)"):
        tok.encode("1 7 3")
    with pytest.raises(ValueError, match="distinct words without spaces"):
        WordTokenizer(["a", "a"])


def test_no_norm_is_the_identity_and_refuses_a_bias() -> None:
    x = torch.randn(2, 3, 8)
    assert torch.equal(NoNorm(8)(x), x) and not list(NoNorm(8).parameters())
    with pytest.raises(ValueError, match="model.norm.bias=false"):
        NoNorm(8, bias=True)


def test_training_learns_histogram_from_examples(tmp_path: Path, capsys) -> None:
    pytest.importorskip("tracr", reason="task 'program' labels its examples with tracr's RASP evaluator: pip install 'anyformer[tracr]'")
    from anyformer.cli import main

    out = tmp_path / "run"
    program = REPO / "configs" / "theory" / "programs" / "histogram.py"
    argv = ["train", str(REPO / "configs" / "theory" / "sort-learned.yaml"), "--out", str(out), f"--task.options.program={program}",
            "--train.max_steps=250", "--train.eval_every=250", "--task.options.train_examples=2048", "--task.options.val_examples=256",
            "--train.max_minutes=null", "--model.max_seq_len=9"]  # steps, not a time budget: CI machines vary
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.strip())
    assert float(rows["accuracy"]) > 0.9 > float(rows["majority_accuracy"]) + 0.3, rows
    assert main(["predict", str(out), "a b a c a"]) == 0
    assert capsys.readouterr().out.strip() == "a b a c a -> 3 1 3 1 3"
