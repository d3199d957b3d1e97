"""A fixed vocabulary of whole words: text is split on whitespace and every word is one id
(the values a compiled program reads: `anyformer/tasks/program.py`)."""

from __future__ import annotations

from typing import Any

from . import TOKENIZERS


@TOKENIZERS.register("words")
class WordTokenizer:
    """Whitespace-separated words from a fixed list; word i is id i."""

    kind = "words"

    def __init__(self, words: list[str]) -> None:
        if len(set(words)) != len(words) or any(not w or w.split() != [w] for w in words):
            raise ValueError(f"a word vocabulary needs distinct words without spaces, got {words}")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def train(cls, text: str, vocab_size: int | None = None) -> "WordTokenizer":
        """The sorted distinct words of `text` (vocab_size is ignored: every word gets an id)."""
        return cls(sorted(set(text.split())))

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        words = text.split()
        bad = sorted({w for w in words if w not in self.index})
        if bad:
            raise ValueError(f"{', '.join(repr(w) for w in bad)} {'is' if len(bad) == 1 else 'are'} not in the vocabulary "
                             f"({' '.join(self.words)}); separate the words by spaces")
        return [self.index[w] for w in words]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "words": self.words}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "WordTokenizer":
        return cls(list(data["words"]))
